"""FFCV data (Leclerc et al., "FFCV: Accelerating Training by Removing Data Bottlenecks", CVPR 2023)
for .beton files written by ``scripts/write_ffcv.py``, with the DeiT recipe on the batch.

Train: ffcv's RandomResizedCropRGBImageDecoder → RandomHorizontalFlip → ToTensor → ToDevice (on
an accelerator) → ToTorchImage (uint8, channels-last), as in ffcv-imagenet; then, on the device, normalisation to the
compute dtype and timm's random erasing (``on_after_batch_transfer``). Mixup/CutMix are applied by
the LightningModule to every backend's batch. Val: CenterCropRGBImageDecoder with ratio 224/256.
ffcv has no RandAugment (its pipeline is compiled with numba and timm's PIL ops cannot run in it):
the FFCV recipe is DeiT's without RandAugment and colour jitter.

The Loaders are built in the ``*_dataloader`` hooks with ``distributed=(world size > 1)``: ffcv
splits the samples across ranks itself, and Lightning adds no sampler to an iterable that is not a
torch DataLoader.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Optional, Sequence

import pytorch_lightning as pl
import torch

from accel.errors import UserInputError
from data.ffcv_install import require_ffcv
from data.folder import IMAGENET_MEAN, IMAGENET_STD
from data.progressive_resolution import ResolutionSchedule

log = logging.getLogger(__name__)

ORDERS = ("quasi_random", "random", "sequential")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(device: torch.device, precision: str, dtype: str = "auto") -> torch.dtype:
    """The dtype images are normalised to: ``auto`` follows the trainer's precision on a GPU
    (bf16-mixed → bfloat16, 16-mixed → float16) and is float32 on a CPU."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda" and str(precision).startswith("bf16"):
        return torch.bfloat16
    if device.type == "cuda" and str(precision).startswith("16"):
        return torch.float16
    return torch.float32


def check_beton(key: str, path: Optional[str], num_classes: int) -> None:
    """One sentence if ``path`` is not an FFCV file with ``image`` and ``label`` fields whose labels
    fit ``num_classes``."""
    if not path or not os.path.isfile(path):
        raise UserInputError(f"data.{key}={path!r} is not a file; expected a .beton written by scripts/write_ffcv.py.")
    from ffcv.reader import Reader
    try:
        reader = Reader(path)
    except Exception as exc:  # noqa: BLE001 - ffcv raises assorted errors on a foreign file
        raise UserInputError(f"data.{key}={path!r} could not be read as an FFCV file ({exc}); expected a .beton "
                             "written by scripts/write_ffcv.py.") from exc
    names = list(reader.handlers)
    if "image" not in names or "label" not in names:
        raise UserInputError(f"data.{key}={path!r} has fields {names}; expected 'image' and 'label' "
                             "(as scripts/write_ffcv.py writes).")
    labels = reader.metadata[f"f{names.index('label')}"]
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserInputError(f"data.{key}={path!r} has labels {int(labels.min())}..{int(labels.max())} but "
                             f"data.num_classes={num_classes}; set data.num_classes to the number of classes.")


@contextmanager
def torch_threads_kept():
    """ffcv sets torch's thread count to its own worker count whenever a Loader is built or
    iterated; keep the trainer's setting (it matters for training on a CPU)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _EpochLoader:
    """An ffcv Loader told the epoch before each pass: ffcv's shuffling (and its distributed split)
    is seeded by the epoch, which must follow the trainer's on resume, and progressive resizing
    sets the decoder's output size for the epoch (training only: ``decoder``/``schedule``)."""

    def __init__(self, loader, trainer, decoder=None, schedule: Optional[ResolutionSchedule] = None) -> None:
        self.loader, self.decoder, self.schedule, self.trainer = loader, decoder, schedule, trainer
        self._passes = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else self._passes
        self._passes += 1
        if self.schedule is not None:
            res = self.schedule(epoch)
            if tuple(self.decoder.output_size) != (res, res):
                log.info("FFCV progressive resizing: epoch %d trains at %d px.", epoch, res)
            self.decoder.output_size = (res, res)
        self.loader.next_epoch = epoch
        with torch_threads_kept():
            return iter(self.loader)


class FFCVDataModule(pl.LightningDataModule):
    """ImageNet-style classification from FFCV .beton files (train and val). ``test`` uses val."""

    def __init__(
        self,
        train_path: Optional[str],
        val_path: Optional[str],
        num_classes: int,
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        order: str = "quasi_random",
        os_cache: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        batches_ahead: int = 3,
        val_crop_ratio: float = 224 / 256,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dtype: str = "auto",
        random_erasing: Optional[Dict[str, Any]] = None,
        progressive: Optional[Dict[str, int]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if order not in ORDERS:
            raise UserInputError(f"data.order={order!r} is not one of {', '.join(ORDERS)}.")
        if dtype != "auto" and dtype not in DTYPES:
            raise UserInputError(f"data.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}.")
        self.num_classes = num_classes
        self.image_size = image_size
        self.batch_size = batch_size
        self.schedule = None
        if progressive:
            unknown = set(progressive) - set(ResolutionSchedule.__dataclass_fields__)
            if unknown:
                raise UserInputError(f"data.progressive has unknown keys {sorted(unknown)}; expected min_res, max_res, "
                                     "start_ramp, end_ramp and step.")
            self.schedule = ResolutionSchedule(**progressive)
        require_ffcv()
        check_beton("train_path", train_path, num_classes)
        check_beton("val_path", val_path, num_classes)
        self._erasing = None
        self._val_loader = None

    # --- loaders ------------------------------------------------------------------------------
    def _world_and_device(self):
        if self.trainer is None:
            return 1, torch.device("cpu")
        return self.trainer.world_size, self.trainer.strategy.root_device

    def _loader(self, path: str, image_pipeline, order: str, drop_last: bool):
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        hp = self.hparams
        world, device = self._world_and_device()
        if order == "quasi_random" and world > 1:
            # ffcv implements QUASI_RANDOM for one process only (as ffcv-imagenet, use RANDOM under DDP).
            log.info("data.order=quasi_random is single-process in ffcv; using random under %d processes.", world)
            order = "random"
        # ToDevice moves the batch to the accelerator; on a CPU the batch is already there and
        # ToDevice would only copy it (~20% of the throughput on a 2-core machine), so it is left out.
        to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
        image = [*image_pipeline, ToTensor(), *to_device, ToTorchImage()]
        label = [IntDecoder(), ToTensor(), Squeeze(1), *to_device]
        with torch_threads_kept():
            return Loader(path, batch_size=hp.batch_size, num_workers=hp.num_workers, os_cache=hp.os_cache,
                          order=getattr(OrderOption, order.upper()), distributed=world > 1, seed=hp.seed,
                          drop_last=drop_last, batches_ahead=hp.batches_ahead,
                          pipelines={"image": image, "label": label})

    def train_dataloader(self) -> _EpochLoader:
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip

        hp = self.hparams
        res = self.schedule(0) if self.schedule else hp.image_size
        decoder = RandomResizedCropRGBImageDecoder((res, res), scale=tuple(hp.scale), ratio=tuple(hp.ratio))
        pipeline = [decoder, RandomHorizontalFlip()] if hp.hflip else [decoder]
        # drop_last keeps every batch full and even-sized, which timm's Mixup requires.
        loader = self._loader(hp.train_path, pipeline, hp.order, hp.drop_last)
        return _EpochLoader(loader, self.trainer, decoder, self.schedule)

    def val_dataloader(self) -> _EpochLoader:
        # Built once and shared with test: each new ffcv Loader compiles its pipeline again (numba).
        if self._val_loader is None:
            from ffcv.fields.decoders import CenterCropRGBImageDecoder

            hp = self.hparams
            decoder = CenterCropRGBImageDecoder((hp.image_size, hp.image_size), ratio=hp.val_crop_ratio)
            self._val_loader = self._loader(hp.val_path, [decoder], "sequential", drop_last=False)
        return _EpochLoader(self._val_loader, self.trainer)

    def test_dataloader(self) -> _EpochLoader:
        return self.val_dataloader()

    # --- on the device ------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images → normalised images in the compute dtype; random erasing when training."""
        images, labels = batch
        precision = self.trainer.precision if self.trainer is not None else "32-true"
        dtype = compute_dtype(images.device, precision, self.hparams.dtype)
        images = self.normalize(images, dtype)
        training = self.trainer is not None and self.trainer.training
        if training and self.hparams.random_erasing:
            images = self.random_erasing(images.device)(images)
        return images, labels.reshape(-1).long()

    def normalize(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(x / 255 - mean) / std, computed in float32 and stored in ``dtype``."""
        mean = torch.tensor(self.hparams.mean, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.hparams.std, device=images.device).view(1, 3, 1, 1) * 255
        return images.float().sub_(mean).div_(std).to(dtype)

    def random_erasing(self, device: torch.device):
        """timm's RandomErasing (DeiT: probability 0.25, per-pixel noise), made once per device."""
        if self._erasing is None or self._erasing[0] != device:
            from timm.data.random_erasing import RandomErasing
            self._erasing = (device, RandomErasing(device=str(device), **self.hparams.random_erasing))
        return self._erasing[1]
