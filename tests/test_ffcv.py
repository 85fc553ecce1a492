"""FFCV backend: the writer (scripts/write_ffcv.py) and data=imagenet_ffcv, on small generated images.

Images of one uniform colour per class make the read-back exact: whatever crop or resize the
decoder applies, every pixel of a sample must be its class colour, so labels, pixels and the
normalisation are all checked against known values."""
from __future__ import annotations

import csv
import glob
import importlib.util
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from accel.errors import UserInputError
from data.folder import IMAGENET_MEAN, IMAGENET_STD
from conftest import QUIET, ROOT, run_train, write_jpeg_folder

import data.ffcv_writer as ffcv_writer  # noqa: E402
from data.ffcv import FFCVDataModule, compute_dtype  # noqa: E402
from data.ffcv_install import FFCV_VERSION, require_ffcv  # noqa: E402
from data.progressive_resolution import ResolutionSchedule  # noqa: E402

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
SCRIPT = os.path.join(ROOT, "scripts", "write_ffcv.py")


def _writer_cli():
    spec = importlib.util.spec_from_file_location("write_ffcv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_ffcv = _writer_cli()


def write_colour_folder(root, per_class=6, splits=("train", "val")) -> str:
    """root/<split>/class<c>/<i>.png: uniform class colour, sizes from 40×48 to 90×60 (PNG: lossless)."""
    for split in splits:
        for c, colour in enumerate(COLOURS):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (40 + 10 * i, 48 + 2 * i), colour).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def count_samples(path: str) -> int:
    from ffcv.reader import Reader
    return int(Reader(path).num_samples)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = write_colour_folder(tmp_path_factory.mktemp("colours"))
    out = tmp_path_factory.mktemp("betons")
    write_ffcv.main([root, str(out), "--write-mode", "raw", "--num-workers", "2"])
    return str(out / "train.beton"), str(out / "val.beton")


def test_pin_matches_requirements_and_missing_ffcv_says_how_to_install(monkeypatch):
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert f"ffcv=={FFCV_VERSION}\n" in f.read()
    assert require_ffcv().__name__ == "ffcv"
    monkeypatch.setitem(sys.modules, "ffcv", None)   # import ffcv now raises ImportError
    with pytest.raises(UserInputError) as err:
        require_ffcv()
    msg = str(err.value)
    assert f"pip install ffcv=={FFCV_VERSION}" in msg and "libturbojpeg0-dev" in msg and "libopencv-dev" in msg


def test_read_back_labels_pixels_and_normalisation(betons):
    train, val = betons
    assert count_samples(train) == 18 and count_samples(val) == 18
    threads = torch.get_num_threads()
    dm = FFCVDataModule(train, val, num_classes=3, image_size=24, batch_size=5, num_workers=1, drop_last=False,
                        order="quasi_random", random_erasing=None)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for loader, name in ((dm.train_dataloader(), "train"), (dm.val_dataloader(), "val")):
        seen = []
        for images, labels in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
            colours = torch.tensor(COLOURS, dtype=torch.uint8)[labels.long()]
            assert torch.equal(images, colours[:, :, None, None].expand_as(images)), name   # pixels follow labels
            x, y = dm.on_after_batch_transfer((images, labels), 0)
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (images.shape[0],)
            expected = (colours.float()[:, :, None, None] / 255 - mean) / std
            torch.testing.assert_close(x, expected.expand_as(x), atol=1e-5, rtol=0)
            seen += y.tolist()
        assert sorted(seen) == [c for c in range(3) for _ in range(6)], name
        if name == "val":
            assert seen == sorted(seen)   # sequential order
    assert torch.get_num_threads() == threads   # ffcv would set it to its worker count


def test_progressive_resolution_sets_the_decoder_size_each_epoch(betons):
    schedule = ResolutionSchedule(min_res=160, max_res=192, start_ramp=2, end_ramp=6)
    assert [schedule(e) for e in range(8)] == [160, 160, 160, 160, 192, 192, 192, 192]   # 168 → 160, 176 → 192
    with pytest.raises(UserInputError, match="min_res=200, max_res=192"):
        ResolutionSchedule(min_res=200, max_res=192)
    with pytest.raises(UserInputError, match=r"data.progressive has unknown keys \['start'\]"):
        FFCVDataModule(*betons, num_classes=3, progressive=dict(start=1))
    dm = FFCVDataModule(*betons, num_classes=3, image_size=32, batch_size=6, num_workers=1, random_erasing=None,
                        progressive=dict(min_res=16, max_res=32, start_ramp=0, end_ramp=1, step=16))
    loader = dm.train_dataloader()
    sizes = [next(iter(loader))[0].shape[-1] for _ in range(2)]
    assert sizes == [16, 32]


def test_compute_dtype_follows_device_and_precision():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compute_dtype(gpu, "bf16-mixed") == torch.bfloat16
    assert compute_dtype(gpu, "16-mixed") == torch.float16
    assert compute_dtype(gpu, "32-true") == torch.float32
    assert compute_dtype(cpu, "bf16-mixed") == torch.float32
    assert compute_dtype(cpu, "32-true", "bfloat16") == torch.bfloat16


def test_bad_paths_and_labels_are_one_sentence(betons, tmp_path):
    with pytest.raises(UserInputError, match="data.train_path='nope.beton' is not a file"):
        FFCVDataModule("nope.beton", betons[1], num_classes=3)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not an ffcv file" * 10)
    with pytest.raises(UserInputError, match="could not be read as an FFCV file"):
        FFCVDataModule(str(junk), betons[1], num_classes=3)
    with pytest.raises(UserInputError, match=r"labels 0\.\.2 but data.num_classes=2"):
        FFCVDataModule(*betons, num_classes=2)


def test_force_refuses_then_overwrites(betons, tmp_path):
    root = write_colour_folder(tmp_path / "imgs", per_class=2, splits=("train",))
    out = tmp_path / "out"
    out.mkdir()
    target = out / "train.beton"
    target.write_bytes(b"precious")
    with pytest.raises(UserInputError) as err:
        write_ffcv.main([root, str(out), "--splits", "train", "--num-workers", "1"])
    assert str(err.value) == f"{target} already exists; pass --force to overwrite it (it is left untouched)."
    assert target.read_bytes() == b"precious"
    write_ffcv.main([root, str(out), "--splits", "train", "--num-workers", "1", "--force"])
    assert count_samples(str(target)) == 6
    assert sorted(os.listdir(out)) == ["train.beton"]


def test_interrupted_or_failed_write_leaves_no_file(tmp_path, monkeypatch):
    root = write_colour_folder(tmp_path / "imgs", per_class=8, splits=("train",))
    out = tmp_path / "out"
    out.mkdir()
    import ffcv.writer

    def ctrl_c(seconds):   # ffcv's progress loop sleeps while its workers write: Ctrl-C arrives there
        raise KeyboardInterrupt

    monkeypatch.setattr(ffcv.writer, "sleep", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_ffcv.main([root, str(out), "--splits", "train", "--num-workers", "2"])
    assert os.listdir(out) == []
    assert multiprocessing.active_children() == []   # the writer's workers (and its manager) ended
    monkeypatch.undo()

    def disk_full(self, allocations):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "finalize", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_ffcv.main([root, str(out), "--splits", "train", "--num-workers", "2"])
    assert os.listdir(out) == []


@pytest.fixture()
def folder_with_corrupt_jpeg(tmp_path):
    root = write_jpeg_folder(tmp_path / "imgs", classes=2, per_class=4, splits=("train",))
    bad = os.path.join(root, "train", "class1", "2.JPEG")
    with open(bad, "r+b") as f:   # keep the JPEG header, garble the rest
        f.seek(200)
        f.write(os.urandom(400))
        f.truncate(700)
    (tmp_path / "out").mkdir()
    return root, bad, tmp_path / "out"


def test_corrupt_jpeg_stop_names_it_and_writes_nothing(folder_with_corrupt_jpeg):
    root, bad, out = folder_with_corrupt_jpeg
    proc = subprocess.run([sys.executable, SCRIPT, root, str(out), "--splits", "train", "--num-workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Image {bad} could not be decoded") and last.endswith("--on-corrupt skip to leave such files out.")
    assert os.listdir(out) == []


def test_corrupt_jpeg_skip_lists_it_and_writes_the_rest(folder_with_corrupt_jpeg, capsys):
    root, bad, out = folder_with_corrupt_jpeg
    write_ffcv.main([root, str(out), "--splits", "train", "--num-workers", "2", "--on-corrupt", "skip"])
    printed = capsys.readouterr().out
    assert f"skipped {bad}: " in printed and "skipped 1 unreadable" in printed
    assert count_samples(str(out / "train.beton")) == 7
    assert sorted(os.listdir(out)) == ["train.beton"]


class LabelRecorder(pl.Callback):
    """Test-only: appends each training batch's labels (here: sample indices) to rank<r>.txt."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.txt"), "a") as f:
            f.write(" ".join(str(v) for v in batch[1].tolist()) + "\n")


def test_train_py_ddp_sim_over_ffcv_sees_disjoint_samples(tmp_path):
    # One image per class, so a label is a sample index: 16 samples, 2 ranks × 2 batches of 4.
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(16):
        os.makedirs(root / "train" / f"c{i:02d}")
        base = rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)
        Image.fromarray(base).resize((56, 48), Image.BICUBIC).save(root / "train" / f"c{i:02d}" / "0.jpg", quality=90)
    os.symlink(root / "train", root / "val")
    write_ffcv.main([str(root), str(tmp_path), "--num-workers", "2"])
    record = tmp_path / "record"
    record.mkdir()
    proc = run_train([
        *QUIET, "data=imagenet_ffcv", f"data.train_path={tmp_path}/train.beton", f"data.val_path={tmp_path}/val.beton",
        "data.num_classes=16", "data.image_size=32", "data.batch_size=4", "data.num_workers=1",
        "model=vit_digits", "++model.depth=2", "++model.embed_dim=64", "++model.num_heads=2",
        "trainer=ddp_sim", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0",
        "+callbacks.record._target_=test_ffcv.LabelRecorder",
        f"+callbacks.record.out_dir={record}", f"hydra.run.dir={tmp_path}/run",
    ], env_extra={"PYTHONPATH": os.path.join(ROOT, "tests")})   # so the callback's module imports
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[int(v) for line in open(record / f"rank{r}.txt") for v in line.split()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(16))
    metrics = glob.glob(f"{tmp_path}/run/csv/**/metrics.csv", recursive=True)
    assert metrics, os.listdir(tmp_path / "run")
    with open(metrics[0]) as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v}
    assert {"train/loss_epoch", "val/acc1", "best/val_acc1"} <= logged


def test_many_corrupt_files_stop_cleanly_in_process(tmp_path):
    """Several workers reporting bad files at once: one sentence, no file, no worker left running
    (a second report must not interrupt the clean-up of the first)."""
    root = tmp_path / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            (root / c / f"{i}.jpg").write_bytes(os.urandom(1500))
    before = set(multiprocessing.active_children())
    with pytest.raises(UserInputError, match="could not be decoded"):
        ffcv_writer.write_split(str(root), str(tmp_path / "train.beton"), ffcv_writer.ImageFieldOptions(), 4)
    assert not (set(multiprocessing.active_children()) - before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
