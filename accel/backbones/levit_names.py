"""Parameter names of the official LeViT release (facebookresearch/LeViT: ``patch_embed.0.c``,
``blocks.k.m.qkv.c``, ``head.l``, …) ↔ timm's ``levit_*`` names used here (``stem.conv1.linear``,
``stages.s.blocks.j.attn.qkv.linear``, ``head.linear``, …). The official model is one flat
``blocks`` list — per stage the (attention, MLP) residual pairs, and between stages the subsampling
attention followed by its MLP — which is timm's order, two official indices per timm block."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

_BLOCK = [("attn.qkv.", "m.qkv.", 0), ("attn.proj.ln.", "m.proj.1.", 0), ("attn.attention_biases", "m.attention_biases", 0),
          ("mlp.ln1.", "m.0.", 1), ("mlp.ln2.", "m.2.", 1)]
_DOWN = [("attn_downsample.kv.", "kv.", 0), ("attn_downsample.q.ln.", "q.1.", 0),
         ("attn_downsample.proj.ln.", "proj.1.", 0), ("attn_downsample.attention_biases", "attention_biases", 0),
         ("mlp.ln1.", "m.0.", 1), ("mlp.ln2.", "m.2.", 1)]


def is_official_levit(sd: StateDict) -> bool:
    return "patch_embed.0.c.weight" in sd


def _layout(sd_timm_keys) -> Dict[Tuple[int, str, int], int]:
    """Official block index of every timm (stage, 'down' | block j) unit, in model order."""
    units: List[Tuple[int, str, int]] = []
    for k in sd_timm_keys:
        m = re.match(r"stages\.(\d+)\.(downsample|blocks\.(\d+))\.", k)
        if m:
            unit = (int(m.group(1)), "down" if m.group(2) == "downsample" else "block", int(m.group(3) or 0))
            if unit not in units:
                units.append(unit)
    units.sort(key=lambda u: (u[0], u[1] == "block", u[2]))
    return {u: 2 * i for i, u in enumerate(units)}


def _leaf(rest: str, head: bool) -> str:
    """timm ``linear.`` → official ``c.`` (``l.`` in the BN-Linear heads)."""
    return rest.replace("linear.", "l." if head else "c.", 1) if rest.startswith("linear.") else rest


def timm_to_official(sd: StateDict) -> StateDict:
    index = _layout(sd)
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"stem\.conv(\d)\.(.*)", k)
        if m:
            out[f"patch_embed.{2 * (int(m.group(1)) - 1)}.{_leaf(m.group(2), False)}"] = v
            continue
        m = re.match(r"(head|head_dist)\.(.*)", k)
        if m:
            out[f"{m.group(1)}.{_leaf(m.group(2), True)}"] = v
            continue
        m = re.match(r"stages\.(\d+)\.(?:blocks\.(\d+)|downsample)\.(.*)", k)
        if not m:
            out[k] = v
            continue
        stage, j, rest = int(m.group(1)), m.group(2), m.group(3)
        unit = (stage, "block" if j is not None else "down", int(j or 0))
        for ours, theirs, offset in (_BLOCK if j is not None else _DOWN):
            if rest.startswith(ours):
                out[f"blocks.{index[unit] + offset}.{theirs}{_leaf(rest[len(ours):], False)}"] = v
                break
        else:
            raise KeyError(f"No official LeViT name for {k!r}.")
    return out


def official_to_timm(sd: StateDict, timm_keys) -> StateDict:
    """Official names → timm names; ``timm_keys`` (the target model's state-dict keys) fix the layout."""
    official_of = timm_to_official({k: k for k in timm_keys})  # official name → timm name
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("attention_bias_idxs"):
            continue  # recomputed by the model
        out[official_of.get(k, k)] = v
    return out
