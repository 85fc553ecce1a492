"""Write an ImageFolder (root/train/<class>/*, root/val/<class>/*) as FFCV .beton files.

    python scripts/write_ffcv.py /datasets/imagenet /datasets/ffcv --write-mode jpg \
        --max-resolution 256 --jpeg-quality 90 --num-workers 16
    # → /datasets/ffcv/train.beton and /datasets/ffcv/val.beton, for
    python train.py data=imagenet_ffcv data.train_path=/datasets/ffcv/train.beton data.val_path=/datasets/ffcv/val.beton

Each file is written to a hidden temporary file beside it and renamed when complete, so a failure
or Ctrl-C leaves nothing behind. An existing file is not overwritten without --force. A file that
cannot be decoded stops the run naming it (--on-corrupt stop, exit 2) or is left out and listed
(--on-corrupt skip)."""
from __future__ import annotations

import argparse
import os
import sys

from accel.errors import UserInputError, run_cli
from data.ffcv_writer import ON_CORRUPT, WRITE_MODES, ImageFieldOptions, check_outputs, write_split
from data.layout import split_folders


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="ImageFolder root holding the split folders")
    p.add_argument("out_dir", help="folder for <split>.beton")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="sub-folders of root to write (default: train val)")
    p.add_argument("--write-mode", default="jpg", choices=WRITE_MODES,
                   help="jpg: JPEG-compress every image; raw: uint8 pixels; proportion: JPEG with --compress-probability")
    p.add_argument("--max-resolution", type=int, default=256,
                   help="resize so that the longer side is at most this (px); 0 = keep full resolution (default 256)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=0.5, help="for --write-mode proportion")
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1), help="writer processes")
    p.add_argument("--on-corrupt", default="stop", choices=ON_CORRUPT,
                   help="stop: name the first unreadable image and exit 2, writing nothing; skip: leave it out and list it")
    p.add_argument("--force", action="store_true", help="overwrite existing .beton files")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    options = ImageFieldOptions(args.write_mode, args.max_resolution or None, args.jpeg_quality,
                                args.compress_probability)
    options.check()
    if args.num_workers < 1:
        raise UserInputError(f"--num-workers {args.num_workers} must be at least 1.")
    folders = split_folders(args.root, args.splits)
    outputs = [os.path.join(args.out_dir, f"{split}.beton") for split in args.splits]
    check_outputs(outputs, args.force)
    classes = None
    for folder, out in zip(folders, outputs):
        print(f"Writing {folder} → {out} ({args.write_mode}, max resolution {options.max_resolution or 'full'})",
              flush=True)
        # This process exits right after a stop, so it may interrupt the pass by signal (see write_split).
        report = write_split(folder, out, options, args.num_workers, args.on_corrupt, classes,
                             stop_early=__name__ == "__main__")
        classes = report.classes
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}")
        skipped = f", skipped {len(report.skipped)} unreadable" if report.skipped else ""
        print(f"Wrote {report.written} images to {out} ({os.path.getsize(out) / 2**20:.1f} MiB){skipped}.", flush=True)


if __name__ == "__main__":
    try:
        run_cli(main)
    except KeyboardInterrupt:
        print("interrupted; no partial .beton file was left behind.", file=sys.stderr)
        sys.exit(130)
