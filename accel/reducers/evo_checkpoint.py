"""Convert between Evo-ViT's released DeiT checkpoints (YifanXu74/Evo-ViT, deit/evo_deit.py naming:
``norms``/``qks``/``vs``/``projs`` per block, ``head_cls``/``norm_cls``) and timm's ViT naming used
here (``blocks.i.norm1``, ``blocks.i.attn.qkv`` = [q|k|v], ``blocks.i.attn.proj``; the auxiliary
[CLS] head under ``reducer.``)."""
from __future__ import annotations

import re
from typing import Dict

import torch

from accel.errors import UserInputError

StateDict = Dict[str, torch.Tensor]
_AUX = {"head_cls.": "reducer.head_cls.", "norm_cls.": "reducer.norm_cls."}


def is_evo_vit(sd: StateDict) -> bool:
    return any(re.match(r"qks\.\d+\.qk\.weight$", k) for k in sd)


def evo_to_timm(sd: StateDict) -> StateDict:
    """Evo-ViT DeiT naming → timm naming (+ ``reducer.head_cls``/``reducer.norm_cls``)."""
    if not is_evo_vit(sd):
        raise UserInputError("The checkpoint is not in Evo-ViT naming (no 'qks.0.qk.weight'); expected a file "
                             "from YifanXu74/Evo-ViT's DeiT models.")
    out: StateDict = {}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("qks."))
    for i in range(depth):
        for p in ("weight", "bias"):
            if f"qks.{i}.qk.{p}" in sd:
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"qks.{i}.qk.{p}"], sd[f"vs.{i}.v.{p}"]], dim=0)
            out[f"blocks.{i}.norm1.{p}"] = sd[f"norms.{i}.{p}"]
            out[f"blocks.{i}.attn.proj.{p}"] = sd[f"projs.{i}.{p}"]
    for k, v in sd.items():
        if k.startswith(("qks.", "vs.", "norms.", "projs.")):
            continue
        for old, new in _AUX.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def timm_to_evo(sd: StateDict) -> StateDict:
    """timm naming (+ ``reducer.`` aux head) → Evo-ViT DeiT naming; the inverse of ``evo_to_timm``."""
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj)\.(weight|bias)$", k)
        if m:
            i, part, p = m.groups()
            if part == "norm1":
                out[f"norms.{i}.{p}"] = v
            elif part == "attn.proj":
                out[f"projs.{i}.{p}"] = v
            else:
                c = v.shape[0] // 3
                out[f"qks.{i}.qk.{p}"], out[f"vs.{i}.v.{p}"] = v[: 2 * c], v[2 * c:]
            continue
        for new, old in ((n, o) for o, n in _AUX.items()):
            if k.startswith(new):
                k = old + k[len(new):]
        out[k] = v
    return out
