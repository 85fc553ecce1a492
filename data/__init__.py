"""LightningDataModules: ImageFolder (ImageNet), the embedded digits set, synthetic tensors."""
