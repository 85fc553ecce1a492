"""ImageFolder data (ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg) with the
DeiT training transforms (Touvron et al. 2021, Sec. 6: RandAugment, random erasing, colour jitter)
built by timm's ``create_transform``."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, DistributedSampler

from accel.errors import UserInputError
from data.checked_folder import CheckedImageFolder
from data.layout import split_folders

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RankedRepeatAugSampler(RepeatAugSampler, DistributedSampler):
    """DeiT's repeated augmentation (Touvron et al. 2021, Sec. 6; Hoffer et al. 2020), timm's
    RepeatAugSampler unchanged: each image ``num_repeats`` times per epoch, consecutive copies on
    different ranks. It already draws this rank's share, so it is also typed as a DistributedSampler:
    Lightning leaves those alone under DDP, whereas any other sampler gets wrapped in a
    DistributedSamplerWrapper that would shard it a second time (1/world² of the data per rank)."""


class ImageFolderDataModule(pl.LightningDataModule):
    """Image classification from a train/ + val/ ImageFolder. ``test`` uses val/ (ImageNet's test
    labels are not public). ``repeated_aug`` > 1 uses DeiT's repeated augmentation sampler."""

    def __init__(
        self,
        root: Optional[str],
        num_classes: int,
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_transform: Optional[Dict[str, Any]] = None,
        repeated_aug: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = root
        self.num_classes = num_classes
        self.image_size = image_size
        self.batch_size = batch_size
        self.train_set = self.val_set = None
        if not self._writes_its_own_data():
            split_folders(root, name="data.root")

    def _writes_its_own_data(self) -> bool:
        return False

    def transforms(self, training: bool):
        hp = self.hparams
        common = dict(input_size=hp.image_size, interpolation=hp.interpolation, mean=tuple(hp.mean), std=tuple(hp.std))
        if training:
            return create_transform(is_training=True, **common, **dict(hp.train_transform or {}))
        return create_transform(is_training=False, crop_pct=hp.crop_pct, **common)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = CheckedImageFolder(os.path.join(self.root, "train"), self.transforms(True))
        self.val_set = CheckedImageFolder(os.path.join(self.root, "val"), self.transforms(False))
        found = len(self.train_set.classes)
        if found != self.num_classes:
            raise UserInputError(f"{self.root}/train has {found} class folders but data.num_classes={self.num_classes}; "
                                 "set data.num_classes to the number of classes.")
        if self.val_set.classes != self.train_set.classes:
            raise UserInputError(f"{self.root}/val has class folders {self.val_set.classes[:3]}… that differ from "
                                 f"train/ {self.train_set.classes[:3]}…; expected the same class names in both.")

    def _loader(self, dataset, shuffle: bool, drop_last: bool, sampler=None) -> DataLoader:
        hp = self.hparams
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=shuffle if sampler is None else False,
                          sampler=sampler, num_workers=hp.num_workers, pin_memory=hp.pin_memory and torch.cuda.is_available(),
                          drop_last=drop_last, persistent_workers=hp.persistent_workers and hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.hparams.repeated_aug > 1:
            world = self.trainer.world_size if self.trainer else 1
            rank = self.trainer.global_rank if self.trainer else 0
            sampler = RankedRepeatAugSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                       num_repeats=self.hparams.repeated_aug)
        # drop_last keeps every batch even-sized, which timm's Mixup requires.
        return self._loader(self.train_set, shuffle=True, drop_last=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
