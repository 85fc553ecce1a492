"""Small token-reducing networks for the device, precision, host-sync and compile tests: every
reducer on DeiT-T-wide blocks over 64 px images with 8 px patches (64 image tokens), and Evo-LeViT-128S
on 64 px images. Built in seconds on a CPU; each reduces tokens in some of its blocks."""
from __future__ import annotations

from typing import Callable, Dict

import timm
import torch
from torch import nn

from accel.backbones import create_evo_levit, with_reducer
from accel.reducers import DPCKNN, EViT, EvoViT, KMedoids, PatchMerger, ToMe
from accel.reducers.ats import ATS
from accel.reducers.diffrate import DiffRate
from accel.reducers.dynamicvit import DynamicViT
from accel.reducers.topk import TopK

IMG = 64
DEPTH = 6

REDUCERS: Dict[str, Callable[[], nn.Module]] = {
    "evit": lambda: EViT(0.5, locations=(1, 3)),
    "evit_explicit": lambda: EViT(0.5, locations=(1, 3), explicit_attention=True),
    "topk": lambda: TopK(0.5, locations=(1, 3)),
    "evo": lambda: EvoViT(0.5, start=2, stages=(2, 4)),
    "evo_rep": lambda: EvoViT(0.5, start=2, stages=(2, 4), fast_path="representative"),
    "evo_explicit": lambda: EvoViT(0.5, start=2, stages=(2, 4), explicit_attention=True),
    "tome": lambda: ToMe(r=6),
    "tome_keep_rate": lambda: ToMe(r=None, keep_rate=0.5),
    "tome_explicit": lambda: ToMe(r=6, explicit_attention=True),
    "kmedoids": lambda: KMedoids(0.5, locations=(1, 3)),
    "dpcknn": lambda: DPCKNN(0.5, locations=(1, 3)),
    "patchmerger": lambda: PatchMerger(0.5, locations=(1, 3)),
    "ats": lambda: ATS(0.5, locations=(1, 2, 3, 4)),
    "ats_static": lambda: ATS(0.5, locations=(1, 2, 3, 4), static_width=True),
    "dynamicvit": lambda: DynamicViT(0.7, locations=(1, 3)),
    # kept numbers with [CLS] per block, of 65 tokens
    "diffrate": lambda: DiffRate(prune=[65, 60, 48, 40, 32, 24], merge=[65, 56, 44, 36, 28, 20]),
    "diffrate_search": lambda: DiffRate(search=True, granularity=8, keep_rate=0.6),
}


def small_vit(**kw) -> nn.Module:
    """DeiT-T blocks (dim 192, 3 heads) on 64 px images with 8 px patches."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=DEPTH, **kw)


def small_evo_levit() -> nn.Module:
    torch.manual_seed(0)
    return create_evo_levit("evo_levit_128s", [1, 1] + [0.5] * 7, [0.5] * 3, num_classes=10, img_size=IMG)


def build(name: str) -> nn.Module:
    """The network called ``name``: a key of REDUCERS on ``small_vit``, or ``"evo_levit"``."""
    if name == "evo_levit":
        return small_evo_levit()
    return with_reducer(small_vit(num_classes=10), REDUCERS[name]())


NAMES = [*REDUCERS, "evo_levit"]


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def head_logits(outputs):
    """Every head's logits of a forward: training forwards of Evo-ViT/Evo-LeViT return several
    (``accel.heads.Heads`` or a tuple), eval forwards one tensor."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return outputs.tensors() if hasattr(outputs, "tensors") else list(outputs)


def loss_of(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every head a forward returns."""
    outs = head_logits(outputs)
    return sum(nn.functional.cross_entropy(o.float(), targets) for o in outs) / len(outs)
