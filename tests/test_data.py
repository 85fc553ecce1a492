"""Data modules: digits written once as a stratified JPEG ImageFolder; the DeiT policy on JPEGs."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp

from accel.errors import UserInputError
from conftest import write_jpeg_folder
from data.digits import DigitsDataModule, write_digits_folder
from data.folder import ImageFolderDataModule
from data.synthetic import SyntheticDataModule

DEIT_TRAIN = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                  re_prob=0.25, re_mode="pixel", re_count=1)


def count(root):
    return {split: {c: len(os.listdir(os.path.join(root, split, c))) for c in os.listdir(os.path.join(root, split))}
            for split in ("train", "val")}


def test_digits_written_once_as_stratified_jpeg_folder(tmp_path):
    root = write_digits_folder(str(tmp_path / "d"), image_size=64)
    n = count(root)
    assert sum(n["train"].values()) + sum(n["val"].values()) == 1797
    assert sum(n["val"].values()) == 360
    for c in map(str, range(10)):  # stratified: each class is ~20% val
        share = n["val"][c] / (n["val"][c] + n["train"][c])
        assert 0.17 < share < 0.23
    img = Image.open(os.path.join(root, "train", "3", os.listdir(os.path.join(root, "train", "3"))[0]))
    assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
    stamp = os.path.getmtime(os.path.join(root, "COMPLETE"))
    write_digits_folder(root, image_size=64)
    assert os.path.getmtime(os.path.join(root, "COMPLETE")) == stamp, "an existing set is not rewritten"



def test_digits_replace_an_incomplete_folder_and_leave_no_temporary(tmp_path):
    root = tmp_path / "d"
    (root / "train" / "3").mkdir(parents=True)
    (root / "train" / "3" / "half.jpg").write_bytes(b"")   # an interrupted copy, no COMPLETE marker
    write_digits_folder(str(root), image_size=8)
    assert not (root / "train" / "3" / "half.jpg").exists() and (root / "COMPLETE").is_file()
    assert sum(len(os.listdir(root / "train" / c)) for c in os.listdir(root / "train")) == 1437
    assert os.listdir(tmp_path) == ["d"]

def test_digits_module_batches(tmp_path):
    dm = DigitsDataModule(str(tmp_path), image_size=32, batch_size=16, num_workers=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.max() <= 9
    assert len(dm.val_set) == 360 and len(dm.train_set) == 1437


def test_deit_randaugment_policy_runs_on_real_jpegs(tmp_path):
    root = write_jpeg_folder(tmp_path / "in", classes=2, per_class=8, size=(120, 100))
    dm = ImageFolderDataModule(root, num_classes=2, image_size=64, batch_size=4, num_workers=0,
                               train_transform=DEIT_TRAIN)
    dm.setup("fit")
    torch.manual_seed(0)
    for _ in range(3):
        for x, y in dm.train_dataloader():
            assert x.shape == (4, 3, 64, 64) and torch.isfinite(x).all()
    # The op that breaks with Pillow 13: posterize at the top magnitude asks for 0 bits.
    img = Image.open(os.path.join(root, "train", "class0", "0.JPEG")).convert("RGB")
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={"magnitude_std": 0})
    out = op(img)
    assert out.size == img.size and np.asarray(out).max() == 0


def test_val_transform_resizes_then_centre_crops(tmp_path):
    root = write_jpeg_folder(tmp_path / "in", size=(300, 256))
    dm = ImageFolderDataModule(root, num_classes=2, image_size=224, batch_size=2, num_workers=0)
    dm.setup("fit")
    names = [type(t).__name__ for t in dm.val_set.transform.transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    assert dm.val_set.transform.transforms[0].size == 256
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 224, 224)


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(UserInputError, match=r"data.root='/no/such/imagenet' is not a directory.*train/ and val/"):
        ImageFolderDataModule("/no/such/imagenet", num_classes=1000)


def test_root_without_val_names_the_layout(tmp_path):
    root = write_jpeg_folder(tmp_path / "in", splits=("train",))
    with pytest.raises(UserInputError, match=r"has no val/ class folders"):
        ImageFolderDataModule(root, num_classes=2)


def test_class_count_mismatch_is_reported(tmp_path):
    dm = ImageFolderDataModule(write_jpeg_folder(tmp_path / "in"), num_classes=1000, num_workers=0)
    with pytest.raises(UserInputError, match="has 2 class folders but data.num_classes=1000"):
        dm.setup("fit")


def test_corrupt_image_is_named(tmp_path):
    root = write_jpeg_folder(tmp_path / "in", per_class=2)
    bad = os.path.join(root, "train", "class1", "1.JPEG")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])  # truncated JPEG
    dm = ImageFolderDataModule(root, num_classes=2, image_size=32, batch_size=4, num_workers=1,
                               persistent_workers=False)
    dm.setup("fit")
    with pytest.raises(UserInputError, match=r"Image .*class1/1.JPEG could not be decoded"):
        for _ in dm.train_dataloader():
            pass


def test_synthetic_is_deterministic():
    dm = SyntheticDataModule(num_classes=7, image_size=16, batch_size=4, train_samples=8, val_samples=4)
    dm.setup()
    a, b = dm.val_set[3], dm.val_set[3]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and 0 <= a[1] < 7
