"""Speed, cost and (optionally) accuracy of model configs, as ratios to a baseline measured in the
same run.

    python scripts/benchmark.py deit_s "evit_deit_s keep_rate=0.7" evo_deit_s "tome_deit_s"
    python scripts/benchmark.py deit_s "evit_deit_s keep_rate=0.5,0.6,0.7,0.8,0.9" --compile
    python scripts/benchmark.py deit_s evit_deit_s --data "data=imagenet data.root=/x" \
        --model-args "model.pretrained_path=evit.pth"

Each model is a string of Hydra overrides of conf/train.yaml (a bare first word is ``model=<word>``;
comma lists expand; the words ``fused`` (LeViT BatchNorm folding), ``reparam`` (slide attention's
merged convolution), ``sdpa`` (timm attention modules' fused-attention switch, off in timm's Swin)
and ``packed``
(accel.cpu_inference's packed oneDNN linears) transform the model for the inference columns only). All models are built in one process; timings warm up first, then each model
is timed in turn, rotating the order every round, and the median is reported. Columns:
inference img/s, one training step (forward + backward + AdamW) img/s, forward GMACs
(torch.utils.flop_counter, attention included on CPU too), parameters, peak memory of a training
step (CUDA: max allocated; CPU: bytes of tensors saved for backward) and, with ``--data``, val top-1.
Writes benchmark.csv and benchmark.png (throughput against GMACs, one curve per method).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PROJECT_ROOT", ROOT)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from accel.backbones.levit import fuse_levit  # noqa: E402
from accel.backbones.slide_swin import reparameterize_slide  # noqa: E402
from accel.cpu_inference import pack_for_cpu_inference  # noqa: E402
from accel.flops import count_flops  # noqa: E402
from accel.heads import Heads  # noqa: E402
from accel.reducers.protocol import TokenReducingNet  # noqa: E402
from pipeline import instantiate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Entry:
    label: str
    overrides: List[str]
    net: torch.nn.Module
    method: str
    keep_rate: float
    infer_s: List[float] = field(default_factory=list)
    train_s: List[float] = field(default_factory=list)
    results: Dict[str, float] = field(default_factory=dict)


FLAGS = ("packed", "fused", "reparam", "sdpa")


def expand(spec: str) -> List[List[str]]:
    """One spec string → a list of override lists (comma values expand as in a Hydra sweep).
    The words ``fused`` (LeViT BatchNorm folding), ``reparam`` (slide attention's merged
    convolution) and ``packed`` (accel.cpu_inference) are inference transforms, not overrides."""
    words = spec.split()
    if words and "=" not in words[0]:
        words[0] = f"model={words[0]}"
    flags = [w for w in words if w in FLAGS]
    choices = [[f"{w.split('=', 1)[0]}={v}" for v in w.split("=", 1)[1].split(",")] for w in words if w not in FLAGS]
    return [list(c) + flags for c in itertools.product(*choices)]


def compose_cfg(overrides: List[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


def build(overrides: List[str], args) -> Entry:
    sized = [f"data.image_size={args.img_size}", f"data.num_classes={args.num_classes}"]
    flags = [o for o in overrides if o in FLAGS]
    cfg = compose_cfg(["data=synthetic", *sized, *[o for o in overrides if o not in FLAGS], *args.model_args.split()])
    net = instantiate(cfg.module).net
    # The method is the configured reducer's class; its settings are read from the config, the keep
    # rate from the built network (TokenReducingNet), where a model's own defaults are applied.
    reducer = cfg.get("reducer") or {}
    method = reducer["_target_"].rsplit(".", 1)[-1] if reducer else "timm"
    if reducer.get("explicit_attention", False):
        method += " explicit-attention"
    label = " ".join(overrides)
    if method == "timm" and "levit" in label:
        method = "Evo-LeViT" if "evo_levit" in label else "LeViT"
    entry = Entry(label, [o for o in overrides if o not in FLAGS], net, " ".join([method, *flags]),
                  net.keep_rate if isinstance(net, TokenReducingNet) else 1.0)
    entry.flags = flags
    r = reducer.get("r")
    entry.point = f"r={r}" if r is not None else f"{entry.keep_rate:g}"
    return entry


def autocast(args):
    if args.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device, dtype=DTYPES[args.dtype])


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def prepare(entry: Entry, args) -> None:
    net = entry.net.to(args.device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    entry.net = net
    infer = net
    if "fused" in entry.flags or (args.fuse and entry.method.startswith(("LeViT", "Evo-LeViT"))):
        infer = fuse_levit(infer)
    if "reparam" in entry.flags:
        infer = reparameterize_slide(copy.deepcopy(infer))
    if "sdpa" in entry.flags:   # timm's attention modules that keep SDPA behind a switch (Swin's)
        infer = copy.deepcopy(infer)
        for m in infer.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    if "packed" in entry.flags:
        infer = pack_for_cpu_inference(infer)
    entry.infer = torch.compile(infer, dynamic=False) if args.compile else infer


def images(batch: int, args) -> torch.Tensor:
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device)
    return x.to(memory_format=torch.channels_last) if args.channels_last else x


def time_inference(entry: Entry, x: torch.Tensor, args) -> float:
    entry.net.eval()
    entry.infer.eval()
    with torch.inference_mode(), autocast(args):
        sync(args)
        start = time.perf_counter()
        entry.infer(x)
        sync(args)
    return time.perf_counter() - start


def train_step(entry: Entry, x: torch.Tensor, y: torch.Tensor, args) -> None:
    entry.net.train()
    with autocast(args):
        heads = Heads.of(entry.net(x)).tensors()
        loss = sum(F.cross_entropy(h.float(), y) for h in heads)
    loss.backward()
    entry.optimizer.step()
    entry.optimizer.zero_grad(set_to_none=True)


def time_train(entry: Entry, x, y, args) -> float:
    sync(args)
    start = time.perf_counter()
    train_step(entry, x, y, args)
    sync(args)
    return time.perf_counter() - start


def train_memory_mb(entry: Entry, x, y, args) -> float:
    """Peak memory of one training step: CUDA max allocated, or on CPU the tensors kept for backward."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_step(entry, x, y, args)
        return torch.cuda.max_memory_allocated() / 2**20
    seen: Dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in entry.net.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:  # activations only; weights are resident anyway
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(entry, x, y, args)
    return sum(seen.values()) / 2**20


@torch.no_grad()
def accuracy(entry: Entry, data_overrides: List[str], args) -> float:
    cfg = compose_cfg([*entry.overrides, *data_overrides])
    dm = instantiate(cfg.data)
    dm.setup("validate")
    # The deployed model (fused / re-parameterised / packed), so its accuracy is what is reported.
    entry.infer.eval()
    correct = total = 0
    for i, (x, y) in enumerate(dm.val_dataloader()):
        if args.eval_batches and i >= args.eval_batches:
            break
        with autocast(args), torch.no_grad():
            pred = entry.infer(x.to(args.device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


def run(args) -> List[Entry]:
    torch.manual_seed(0)
    entries = [build(o, args) for spec in args.models for o in expand(spec)]
    for e in entries:
        prepare(e, args)
        e.optimizer = torch.optim.AdamW(e.net.parameters(), lr=1e-4)
        if args.data:   # before the timed training steps change the weights
            e.results["top1"] = accuracy(e, args.data.split(), args)
    x, xt = images(args.batch, args), images(args.train_batch, args)
    yt = torch.randint(args.num_classes, (args.train_batch,), device=args.device)
    for e in entries:
        e.results["params_M"] = sum(p.numel() for p in e.net.parameters()) / 1e6
        e.results["gmacs"] = count_flops(e.net, images(1, args)) / 2e9  # multiply-accumulates, as papers report (as "FLOPs")
        for _ in range(args.warmup):
            time_inference(e, x, args)
            if args.train:
                time_train(e, xt, yt, args)
        if args.train:
            e.results["train_mem_MB"] = train_memory_mb(e, xt, yt, args)
    for r in range(args.runs):
        order = entries[r % len(entries):] + entries[:r % len(entries)]
        for e in order:
            e.infer_s.append(time_inference(e, x, args))
            if args.train:
                e.train_s.append(time_train(e, xt, yt, args))
    for e in entries:
        e.results["infer_img_s"] = args.batch / statistics.median(e.infer_s)
        if args.train:
            e.results["train_img_s"] = args.train_batch / statistics.median(e.train_s)
    base = next((e for e in entries if e.label == args.baseline), entries[0])
    for e in entries:
        e.results["infer_x"] = e.results["infer_img_s"] / base.results["infer_img_s"]
        if args.train:
            e.results["train_x"] = e.results["train_img_s"] / base.results["train_img_s"]
            e.results["mem_x"] = e.results["train_mem_MB"] / base.results["train_mem_MB"]
    return entries


COLUMNS = ["infer_img_s", "infer_x", "train_img_s", "train_x", "gmacs", "params_M", "train_mem_MB", "mem_x", "top1"]


def report(entries: List[Entry], args) -> None:
    cols = [c for c in COLUMNS if c in entries[0].results]
    width = max(len(e.label) for e in entries)
    setting = (f"device={args.device} batch={args.batch} train_batch={args.train_batch} img={args.img_size} "
               f"dtype={args.dtype} channels_last={args.channels_last} compile={args.compile} runs={args.runs}")
    print(f"\n{setting}\nbaseline: {args.baseline or entries[0].label}")
    print(f"{'model':<{width}}  " + "  ".join(f"{c:>12}" for c in cols))
    for e in entries:
        print(f"{e.label:<{width}}  " + "  ".join(f"{e.results[c]:>12.3f}" for c in cols))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "benchmark.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "method", "keep_rate", *cols, "setting"])
        for e in entries:
            w.writerow([e.label, e.method, e.keep_rate, *[f"{e.results[c]:.4f}" for c in cols], setting])
    plot(entries, os.path.join(args.out_dir, "benchmark.png"), "top1" if args.data else "infer_img_s", setting)
    print(f"wrote {path} and benchmark.png")


def plot(entries: List[Entry], path: str, y: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in dict.fromkeys(e.method for e in entries):
        pts = sorted((e.results["gmacs"], e.results[y], e.point) for e in entries if e.method == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        for gf, val, point in pts:
            ax.annotate(point, (gf, val), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GMACs per image (multiply-accumulates)")
    ax.set_ylabel("val top-1" if y == "top1" else "inference images / s")
    ax.set_title(title, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model specs: Hydra overrides, e.g. 'evit_deit_s keep_rate=0.7'")
    p.add_argument("--baseline", default=None, help="label of the baseline (default: the first model)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the inference forward")
    p.add_argument("--fuse", action="store_true", help="fold LeViT BatchNorms into their Linear/Conv for inference")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step columns")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--model-args", default="", help="overrides added to every model (e.g. pretrained_path)")
    p.add_argument("--data", default="", help="data overrides for val accuracy, e.g. 'data=imagenet data.root=/x'")
    p.add_argument("--eval-batches", type=int, default=0, help="limit val batches (0 = all)")
    p.add_argument("--out-dir", default="benchmarks")
    args = p.parse_args(argv)
    if args.baseline is None:
        args.baseline = " ".join(expand(args.models[0])[0])
    return args


if __name__ == "__main__":
    a = parse()
    report(run(a), a)
