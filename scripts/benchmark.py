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
is timed in turn, rotating the order every round, and the median is reported, with the lowest and
highest of the per-round ratios to the baseline (``*_x_lo``/``*_x_hi``: the spread). On a CPU, freed
memory stays in the process (accel.cpu_allocator; ``--system-malloc`` leaves glibc as it is). Columns:
inference img/s, one training step (forward + backward + AdamW) img/s, forward GMACs
(torch.utils.flop_counter, attention included on CPU too), parameters, peak memory of a training
step (CUDA: max allocated; CPU: bytes of tensors saved for backward) and, with ``--data``, val top-1.
Writes benchmark.csv (each row named as papers name it, "EViT-DeiT-S kr 0.7", with its method's knob:
keep rate or ToMe's r) and benchmark.png (scripts/pareto_plot.py: images/s against GMACs, one curve per
method and backbone over its knob, the baseline as reference lines; with ``--data`` a second panel of
top-1 against images/s); ``--wandb`` also logs the rows as a W&B table with speed/accuracy charts.
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
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PROJECT_ROOT", ROOT)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import get_class  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from accel.backbones.levit import fuse_levit  # noqa: E402
from accel.backbones.slide_swin import reparameterize_slide  # noqa: E402
from accel.cpu_allocator import keep_freed_memory  # noqa: E402
from accel.cpu_inference import pack_for_cpu_inference  # noqa: E402
from accel.flops import count_flops  # noqa: E402
from accel.heads import Heads  # noqa: E402
from accel.reducers.protocol import TokenReducingNet  # noqa: E402
from pipeline import instantiate  # noqa: E402

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:   # its sibling module, when loaded by path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pareto_plot import backbone_name, curve_name, extra_words, figure, format_value, method_label, point_label  # noqa: E402,E501

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Entry:
    spec: str               # the overrides as given (what --baseline names)
    overrides: List[str]
    flags: List[str]
    net: torch.nn.Module
    label: str              # "EViT-DeiT-S kr 0.7"
    curve: str              # "EViT-DeiT-S": the label without the knob's value
    method: str             # the reducer's label, "" for none
    backbone: str           # "DeiT-S"
    knob: str = ""          # "keep_rate", "r" or "" (no knob)
    knob_value: str = ""
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
    # The method is the configured reducer's class; its knob is the class's own (ToMe's r, DiffRate's
    # schedule) where the config sets it, else the keep rate of the built network (TokenReducingNet,
    # where a model's own defaults are applied), else none.
    reducer = cfg.get("reducer") or {}
    reducer_class = get_class(reducer["_target_"]) if reducer else None
    method = method_label(reducer_class)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    backbone = backbone_name(str(model.get("name") or model.get("model_name") or model["_target_"]), model)
    own_knob = getattr(reducer_class, "knob", None)
    if own_knob and reducer.get(own_knob) is not None:
        knob, value = own_knob, format_value(OmegaConf.to_container(reducer, resolve=True)[own_knob])
    elif isinstance(net, TokenReducingNet):
        knob, value = "keep_rate", format_value(float(net.keep_rate))
    else:
        knob, value = "", ""
    rest = [o for o in overrides if o not in FLAGS]
    curve = curve_name(backbone, method, extra_words(rest, flags))
    return Entry(" ".join(overrides), rest, flags, net, point_label(curve, knob, value), curve, method, backbone,
                 knob, value)


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
    if "fused" in entry.flags or (args.fuse and entry.backbone.startswith(("LeViT", "Evo-LeViT"))):
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
    # On a CPU, glibc's malloc would page-fault the larger models' activations in afresh every step
    # (accel.cpu_allocator); keeping freed memory, as the CUDA caching allocator does, times the models.
    args.malloc = "kept" if args.device == "cpu" and not args.system_malloc and keep_freed_memory() else "system"
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
    base = baseline(entries, args)
    for e in entries:
        e.results["infer_x"] = e.results["infer_img_s"] / base.results["infer_img_s"]
        e.results["infer_x_lo"], e.results["infer_x_hi"] = round_spread(base.infer_s, e.infer_s)
        if args.train:
            e.results["train_x"] = e.results["train_img_s"] / base.results["train_img_s"]
            e.results["train_x_lo"], e.results["train_x_hi"] = round_spread(base.train_s, e.train_s)
            e.results["mem_x"] = e.results["train_mem_MB"] / base.results["train_mem_MB"]
    return entries


def round_spread(base_s: List[float], model_s: List[float]) -> Tuple[float, float]:
    """The lowest and highest speed ratio to the baseline over the rounds, each round's ratio taken
    between the two timings of that round (a slowdown of the whole machine during one round cancels)."""
    ratios = [b / m for b, m in zip(base_s, model_s)]
    return min(ratios), max(ratios)


# *_lo / *_hi: the spread of the per-round ratios behind the median ratio (round_spread).
COLUMNS = ["infer_img_s", "infer_x", "infer_x_lo", "infer_x_hi", "train_img_s", "train_x", "train_x_lo", "train_x_hi",
           "gmacs", "params_M", "train_mem_MB", "mem_x", "top1"]


def baseline(entries: List[Entry], args) -> Entry:
    return next((e for e in entries if e.spec == args.baseline), entries[0])


def rows_of(entries: List[Entry], setting: str) -> List[Dict[str, str]]:
    """One dict per model, as benchmark.csv holds it: its spec, name, method, backbone, knob, the
    measured columns and the setting."""
    cols = [c for c in COLUMNS if c in entries[0].results]
    return [{"model": e.spec, "label": e.label, "curve": e.curve, "method": e.method or "none",
             "backbone": e.backbone, "knob": e.knob, "knob_value": e.knob_value,
             **{c: f"{e.results[c]:.4f}" for c in cols}, "setting": setting} for e in entries]


def report(entries: List[Entry], args):
    """Print the table, write benchmark.csv and benchmark.png (and log them to W&B with --wandb);
    return the plot's Figure."""
    cols = [c for c in COLUMNS if c in entries[0].results]
    width = max(len(e.label) for e in entries)
    setting = (f"device={args.device} batch={args.batch} train_batch={args.train_batch} img={args.img_size} "
               f"dtype={args.dtype} channels_last={args.channels_last} compile={args.compile} runs={args.runs}"
               + (f" malloc={args.malloc}" if args.device == "cpu" else ""))
    base = baseline(entries, args)
    print(f"\n{setting}\nbaseline: {base.label} ({base.spec})")
    print(f"{'model':<{width}}  " + "  ".join(f"{c:>12}" for c in cols))
    for e in entries:
        print(f"{e.label:<{width}}  " + "  ".join(f"{e.results[c]:>12.3f}" for c in cols))
    os.makedirs(args.out_dir, exist_ok=True)
    rows = rows_of(entries, setting)
    path = os.path.join(args.out_dir, "benchmark.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = os.path.join(args.out_dir, "benchmark.png")
    fig = figure(rows, entries.index(base), setting)
    fig.savefig(png, dpi=110)
    print(f"wrote {path} and {png}")
    if args.wandb:
        log_wandb(rows, png, args)
    return fig


def log_wandb(rows: List[Dict[str, str]], png: str, args) -> None:
    """The rows as a W&B table (numbers as numbers), scatter charts of images/s against GMACs (and
    top-1 against images/s) drawn from it, and the PNG; offline unless --wandb-online."""
    import wandb
    columns = list(rows[0])
    data = [[float(r[c]) if c in COLUMNS else r[c] for c in columns] for r in rows]
    run = wandb.init(project=args.wandb_project, dir=args.out_dir, job_type="benchmark",
                     mode="online" if args.wandb_online else "offline", config={"setting": rows[0]["setting"]})
    table = wandb.Table(columns=columns, data=data)
    logged = {"benchmark": table, "benchmark_plot": wandb.Image(png),
              "speed_vs_gmacs": wandb.plot.scatter(table, "gmacs", "infer_img_s", title="inference images/s vs GMACs")}
    if "top1" in columns:
        logged["top1_vs_speed"] = wandb.plot.scatter(table, "infer_img_s", "top1", title="top-1 vs inference images/s")
    run.log(logged)
    run.finish()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model specs: Hydra overrides, e.g. 'evit_deit_s keep_rate=0.7'")
    p.add_argument("--baseline", default=None, help="the spec of the baseline as given (default: the first model)")
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
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: leave glibc's malloc as it is (default: keep freed memory, accel.cpu_allocator)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--model-args", default="", help="overrides added to every model (e.g. pretrained_path)")
    p.add_argument("--data", default="", help="data overrides for val accuracy, e.g. 'data=imagenet data.root=/x'")
    p.add_argument("--eval-batches", type=int, default=0, help="limit val batches (0 = all)")
    p.add_argument("--out-dir", default="benchmarks")
    p.add_argument("--wandb", action="store_true", help="also log the rows as a W&B table (in <out-dir>/wandb)")
    p.add_argument("--wandb-project", default="accel-benchmark")
    p.add_argument("--wandb-online", action="store_true", help="sync to W&B now (default: an offline run)")
    args = p.parse_args(argv)
    if args.baseline is None:
        args.baseline = " ".join(expand(args.models[0])[0])
    return args


if __name__ == "__main__":
    a = parse()
    report(run(a), a)
