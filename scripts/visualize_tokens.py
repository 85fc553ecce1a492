"""Draw what a token reducer keeps, fuses or merges for a folder of images.

    python scripts/visualize_tokens.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --images photos/ \
        --out tokens.png
    python scripts/visualize_tokens.py --overrides "model=evit_deit_s keep_rate=0.5" \
        --model-args model.pretrained_path=deit_small.pth --images photos/

The model comes from the run's own config (.hydra/config.yaml next to the checkpoint's run
directory) or from Hydra overrides; images are resized and centre-cropped as for validation. Each row
is titled with the file name and the prediction (ImageNet-1k's class names for 1000 classes), each
block's panel with the tokens kept or left; a legend explains the colours."""
from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PROJECT_ROOT", ROOT)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from timm.data import ImageNetInfo, create_transform  # noqa: E402

from accel.checkpoint import read_state_dict  # noqa: E402
from accel.errors import UserInputError, run_cli  # noqa: E402
from accel.reducers.protocol import TokenReducingNet  # noqa: E402
from accel.visualize import render  # noqa: E402
from data.checked_folder import load_rgb  # noqa: E402
from data.digits import DIGITS_MEAN, DIGITS_STD  # noqa: E402
from data.folder import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipeline import instantiate  # noqa: E402

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def run_config(args):
    if args.ckpt and not args.overrides:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
        saved = os.path.join(run_dir, ".hydra", "config.yaml")
        if not os.path.isfile(saved):
            raise UserInputError(f"No run config at {saved}; pass --overrides to describe the model.")
        cfg = OmegaConf.load(saved)
        cfg.paths.output_dir = run_dir
        return cfg
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("train.yaml", overrides=[*args.overrides.split(), *args.model_args.split()])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--ckpt", default=None, help="a checkpoint of this project")
    p.add_argument("--overrides", default="", help="Hydra overrides describing the model instead of a run")
    p.add_argument("--model-args", default="", help="extra overrides, e.g. model.pretrained_path=…")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--out", default="token_selection.png")
    args = p.parse_args(argv)
    if not os.path.isdir(args.images):
        raise UserInputError(f"--images {args.images!r} is not a directory; expected a folder of images.")
    cfg = run_config(args)
    net = instantiate(cfg.module).net
    if not isinstance(net, TokenReducingNet):
        raise UserInputError(f"The model ({type(net).__name__}) reduces no tokens (reducer=none?); nothing to draw; "
                             "expected a reducer (any reducer=… but none, e.g. reducer=evit) or an Evo-LeViT model.")
    if args.ckpt:
        net.load_state_dict(read_state_dict(args.ckpt))
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.images) for f in fs if f.lower().endswith(EXTENSIONS))
    if not files:
        raise UserInputError(f"No images ({', '.join(EXTENSIONS)}) under {args.images!r}.")
    digits = cfg.data._target_.endswith("DigitsDataModule")
    mean = tuple(cfg.data.get("mean") or (DIGITS_MEAN if digits else IMAGENET_MEAN))
    std = tuple(cfg.data.get("std") or (DIGITS_STD if digits else IMAGENET_STD))
    tf = create_transform(cfg.data.image_size, is_training=False, crop_pct=cfg.data.get("crop_pct") or (1.0 if digits else 0.875),
                          interpolation="bicubic", mean=mean, std=std)
    files = files[: args.num_images]
    images = torch.stack([tf(load_rgb(f)) for f in files])
    class_names = None
    if cfg.data.num_classes == 1000:
        info = ImageNetInfo()
        class_names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
    fig = render(net, images, mean, std, names=[os.path.basename(f) for f in files], class_names=class_names,
                 title=f"keep rate {net.keep_rate:g}")
    fig.savefig(args.out)
    blocks = [ax.get_title().split(":")[0] for ax in fig.axes[1:len(fig.axes) // len(files)]]
    print(f"wrote {args.out}: {len(files)} images ({', '.join(map(os.path.basename, files))}), "
          f"columns: {', '.join(['input', *blocks])}")
    return args.out


if __name__ == "__main__":
    run_cli(main)
