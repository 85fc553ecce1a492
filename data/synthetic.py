"""Random images and labels of any size and class count: for benchmarks and smoke tests."""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class RandomImages(Dataset):
    """``length`` fixed random images (a seeded generator per index, so epochs repeat)."""

    def __init__(self, length: int, image_size: int, num_classes: int, seed: int = 0) -> None:
        self.length, self.image_size, self.num_classes, self.seed = length, image_size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        return image, int(torch.randint(self.num_classes, (1,), generator=g))


class SyntheticDataModule(pl.LightningDataModule):
    """Synthetic data with the same interface as the image-folder modules."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224, batch_size: int = 32,
                 train_samples: int = 256, val_samples: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.num_classes, self.image_size, self.batch_size = num_classes, image_size, batch_size

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        self.train_set = RandomImages(hp.train_samples, hp.image_size, hp.num_classes, seed=0)
        self.val_set = RandomImages(hp.val_samples, hp.image_size, hp.num_classes, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
