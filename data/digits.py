"""scikit-learn's digits (1,797 real 8×8 handwritten digits, 10 classes), shipped with scikit-learn
and written once as a JPEG ImageFolder, so the framework trains on real images with no download."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from accel.atomic import atomic_path
from accel.errors import UserInputError
from data.folder import ImageFolderDataModule

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


def write_digits_folder(root: str, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> str:
    """Write digits as ``root/{train,val}/<digit>/<index>.jpg`` (stratified split); return ``root``.

    Idempotent: an existing complete folder is left alone. The folder is built in a temporary
    sibling and renamed at the end, so an interrupted write never leaves a half-written set."""
    if os.path.isfile(os.path.join(root, "COMPLETE")):
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=val_fraction,
                                          stratify=digits.target, random_state=seed)
    with atomic_path(root, directory=True) as tmp:   # replaces an incomplete earlier attempt
        for split, indices in (("train", idx_train), ("val", idx_val)):
            for i in indices:
                folder = os.path.join(tmp, split, str(digits.target[i]))
                os.makedirs(folder, exist_ok=True)
                img = Image.fromarray(images[i], mode="L").resize((image_size, image_size), Image.BICUBIC)
                img.convert("RGB").save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
        open(os.path.join(tmp, "COMPLETE"), "w").close()
    return root


class DigitsDataModule(ImageFolderDataModule):
    """The default data set: digits as RGB JPEGs of ``image_size`` px, 1,437 train / 360 val."""

    def __init__(self, data_dir: str, image_size: int = 32, val_fraction: float = 0.2, num_classes: int = 10,
                 **kwargs) -> None:
        if num_classes != 10:
            raise UserInputError(f"data.num_classes={num_classes} but digits has 10 classes; leave it at 10.")
        kwargs.setdefault("mean", DIGITS_MEAN)
        kwargs.setdefault("std", DIGITS_STD)
        kwargs.setdefault("crop_pct", 1.0)
        root = os.path.join(data_dir, f"digits_{image_size}px")
        super().__init__(root=root, num_classes=10, image_size=image_size, **kwargs)
        self.val_fraction = val_fraction

    def _writes_its_own_data(self) -> bool:
        return True

    def prepare_data(self) -> None:
        write_digits_folder(self.root, self.image_size, self.val_fraction)

    def setup(self, stage=None) -> None:
        self.prepare_data()  # also when used outside a Trainer
        super().setup(stage)
