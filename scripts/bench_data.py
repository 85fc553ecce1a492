"""Images per second each data backend delivers to a training loop, on the same images, in one run.

    python scripts/bench_data.py                         # 3,000 generated JPEGs (cached in --work-dir)
    python scripts/bench_data.py --images /datasets/imagenet/train --limit 5000

Backends (all: batch 128, 2 workers, 224² RandomResizedCrop + horizontal flip, uint8 out):
  imagefolder_pil     the project's ImageFolder module (data/folder.py: CheckedImageFolder, its DataLoader)
  imagefolder_decode  the same files decoded by torchvision.io.decode_jpeg, crop/flip on the tensor
  torchvision         plain torchvision ImageFolder + DataLoader (the yardstick for the project's module)
  ffcv_jpg256         FFCV .beton, JPEG at max resolution 256 (scripts/write_ffcv.py defaults)
  ffcv_full           FFCV .beton, JPEG at full resolution
One loader per backend is built first; then each round runs one epoch of every backend in turn,
so that a change in machine load hits all of them alike. Round 0 is the warm-up (worker start-up,
numba compilation, page cache) and is not counted; the figure is the median of the other rounds.
Ratios are to imagefolder_pil in the same round of the same run (median over rounds). Writes a
CSV (--out)."""
from __future__ import annotations

import argparse
import csv
import os
import hashlib
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, io as tvio
from torchvision.transforms import v2

from accel.errors import UserInputError, run_cli
from data.folder import ImageFolderDataModule

BACKENDS = ("imagefolder_pil", "imagefolder_decode", "torchvision", "ffcv_jpg256", "ffcv_full")


# --- images -----------------------------------------------------------------------------------
def textured_image(seed: int) -> Image.Image:
    """A photo-like RGB image: shorter side 300-500 px, aspect up to 1.4, smooth noise at three
    scales over a colour gradient plus fine grain, so that its JPEG is about as large and as slow to
    decode as a natural photo's (flat or white-noise images would be far off either way)."""
    rng = np.random.default_rng(seed)
    short = int(rng.integers(300, 501))
    long = int(short * rng.uniform(1.0, 1.4))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    img = np.zeros((h, w, 3), np.float32)
    for cell, amp in ((96, 70.0), (24, 35.0), (6, 18.0)):
        grid = rng.normal(0, 1, (h // cell + 2, w // cell + 2, 3))
        small = Image.fromarray((grid * 40 + 128).clip(0, 255).astype(np.uint8))
        up = np.asarray(small.resize((w + 2 * cell, h + 2 * cell), Image.BICUBIC), np.float32)
        img += (up[cell:cell + h, cell:cell + w] - 128) / 40 * amp
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tilt = rng.normal(0, 1, 2)
    img += rng.uniform(60, 190, 3).astype(np.float32) + 40 * (xx / w * tilt[0] + yy / h * tilt[1])[..., None]
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _save(job):
    path, seed = job
    textured_image(seed).save(path, "JPEG", quality=90)


def generated_folder(work_dir: str, count: int, classes: int = 10) -> str:
    """``work_dir/images_<count>/train/<class>/*.jpg``, made once (kept for later runs)."""
    root = os.path.join(work_dir, f"images_{count}")
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        jobs = []
        for i in range(count):
            folder = os.path.join(root, "train", f"class{i % classes:02d}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{i:05d}.jpg"), i))
        print(f"Generating {count} JPEGs (quality 90) in {root} ...", flush=True)
        with Pool(os.cpu_count()) as pool:
            pool.map(_save, jobs, chunksize=32)
        open(done, "w").close()
    return os.path.join(root, "train")


def image_root(split_dir: str, work_dir: str) -> str:
    """A root with train/ and val/ for the project's module: both point at ``split_dir``."""
    root = os.path.join(work_dir, "folder_root")
    os.makedirs(root, exist_ok=True)
    for name in ("train", "val"):
        link = os.path.join(root, name)
        if os.path.islink(link):
            os.remove(link)
        os.symlink(os.path.abspath(split_dir), link)
    return root


# --- backends ---------------------------------------------------------------------------------
def crop_flip(size: int):
    return [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]


class _PlainCropFolder(ImageFolderDataModule):
    """The project's ImageFolder module with the benchmark's transform (crop + flip, uint8) instead
    of the DeiT recipe, so that only decoding and loading are compared."""

    def transforms(self, training: bool):
        return v2.Compose([*crop_flip(self.image_size), v2.PILToTensor()])


class DecodeJpegFolder(Dataset):
    """Reads the file bytes and decodes them with ``torchvision.io.decode_jpeg`` (libjpeg-turbo)
    into a uint8 tensor; crop and flip run on the tensor."""

    def __init__(self, folder: str, size: int) -> None:
        self.samples = datasets.ImageFolder(folder).samples
        self.transform = v2.Compose(crop_flip(size))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = tvio.decode_jpeg(tvio.read_file(path), mode=tvio.ImageReadMode.RGB)
        return self.transform(image), label


def loader_kwargs(args) -> dict:
    return dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=True, drop_last=True,
                persistent_workers=args.workers > 0)


def build_loaders(args, split_dir: str):
    loaders = {}
    n = len(datasets.ImageFolder(split_dir).samples)
    if "imagefolder_pil" in args.backends:
        classes = len(datasets.ImageFolder(split_dir).classes)
        dm = _PlainCropFolder(image_root(split_dir, args.work_dir), num_classes=classes, image_size=args.size,
                              batch_size=args.batch_size, num_workers=args.workers, pin_memory=False)
        dm.setup()
        loaders["imagefolder_pil"] = dm.train_dataloader()
    if "imagefolder_decode" in args.backends:
        loaders["imagefolder_decode"] = DataLoader(DecodeJpegFolder(split_dir, args.size), **loader_kwargs(args))
    if "torchvision" in args.backends:
        plain = datasets.ImageFolder(split_dir, transform=v2.Compose([*crop_flip(args.size), v2.PILToTensor()]))
        loaders["torchvision"] = DataLoader(plain, **loader_kwargs(args))
    for name, max_res in (("ffcv_jpg256", 256), ("ffcv_full", None)):
        if name in args.backends:
            loaders[name] = ffcv_loader(args, split_dir, name, max_res)
    return loaders, n


def ffcv_loader(args, split_dir: str, name: str, max_res):
    from data.ffcv import FFCVDataModule
    from data.ffcv_writer import ImageFieldOptions, write_split

    files = datasets.ImageFolder(split_dir).samples
    key = hashlib.sha1(f"{os.path.abspath(split_dir)}:{len(files)}".encode()).hexdigest()[:10]
    path = os.path.join(args.work_dir, f"{name}_{key}.beton")   # written once per image set
    if not os.path.exists(path):
        start = time.perf_counter()
        write_split(split_dir, path, ImageFieldOptions("jpg", max_res, 90), num_workers=os.cpu_count() or 1)
        print(f"Wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    classes = len({label for _, label in files})
    dm = FFCVDataModule(path, path, num_classes=classes, image_size=args.size, batch_size=args.batch_size,
                        num_workers=args.workers, random_erasing=None)
    return dm.train_dataloader()   # uint8 on the CPU; normalisation would run on the device


def one_epoch(loader) -> float:
    """Images per second over one pass; the batch is checked (uint8 NCHW) and otherwise untouched."""
    images = 0
    start = time.perf_counter()
    for x, _ in loader:
        assert x.dtype == torch.uint8 and x.dim() == 4, (x.dtype, x.shape)
        images += x.shape[0]
    return images / (time.perf_counter() - start)


# --- report -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="an ImageFolder split (one sub-folder of JPEGs per class); default: generate")
    p.add_argument("--count", type=int, default=3000, help="images to generate (without --images)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "accel-bench-data"),
                   help="generated images and .beton files (kept for later runs)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--epochs", type=int, default=8, help="measured epochs per backend, after one warm-up epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "bench_data.csv"))
    args = p.parse_args(argv)
    if args.images and not os.path.isdir(args.images):
        raise UserInputError(f"--images {args.images!r} is not a directory; expected a folder with one "
                             "sub-folder of JPEGs per class.")
    if args.epochs < 1:
        raise UserInputError(f"--epochs {args.epochs} must be at least 1.")
    os.makedirs(args.work_dir, exist_ok=True)
    split_dir = args.images or generated_folder(args.work_dir, args.count)
    loaders, n = build_loaders(args, split_dir)
    files = datasets.ImageFolder(split_dir).samples
    sizes = [Image.open(f).size for f, _ in files[:200]]
    mean_kb = np.mean([os.path.getsize(f) for f, _ in files]) / 1024
    print(f"{n} images, mean {np.mean([s[0] for s in sizes]):.0f}×{np.mean([s[1] for s in sizes]):.0f} px "
          f"(first 200), {mean_kb:.0f} KiB; batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs", flush=True)

    rates = {name: [] for name in loaders}
    for round_ in range(args.epochs + 1):
        for name, loader in loaders.items():
            rate = one_epoch(loader)
            if round_ > 0:
                rates[name].append(rate)
            print(f"  round {round_}{' (warm-up)' if round_ == 0 else ''} {name}: {rate:.0f} img/s", flush=True)

    median = {name: statistics.median(r) for name, r in rates.items()}
    # Ratios pair each epoch with imagefolder_pil's epoch of the same round (seconds apart), which
    # cancels most of the drift in machine load that the medians of the rates still carry.
    base = rates.get("imagefolder_pil")
    ratios = {name: [a / b for a, b in zip(r, base)] if base else [] for name, r in rates.items()}
    print(f"\n| backend | images/s (median of {args.epochs}) | × imagefolder_pil (median, min–max) |\n|---|---|---|")
    for name in loaders:
        r = ratios[name]
        ratio = f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})" if r else ""
        print(f"| {name} | {median[name]:.0f} | {ratio} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backend", "images_per_sec", "ratio_to_imagefolder_pil", "epoch_rates", "epoch_ratios", "images",
                    "batch_size", "workers", "cpus"])
        for name in loaders:
            r = ratios[name]
            w.writerow([name, f"{median[name]:.1f}", f"{statistics.median(r):.3f}" if r else "",
                        " ".join(f"{x:.1f}" for x in rates[name]), " ".join(f"{x:.3f}" for x in r), n,
                        args.batch_size, args.workers, os.cpu_count()])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
