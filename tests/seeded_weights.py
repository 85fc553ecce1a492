"""Random weights drawn from a seed in a fixed order, for reference fixtures whose models are too large to
store (LeViT-128S: 7.8M parameters, Slide-Swin-T: 28M). The fixture keeps the names and shapes (in the
authors' naming), the tensors that are not random (index buffers, the fixed shift kernel) and a fingerprint
of every drawn tensor; the generator and the test both rebuild the state dict with ``draw_state_dict``.

Scales keep activations O(1) in a random network: weights N(0, 1/fan_in), biases N(0, 0.1²), norm scales
N(1, 0.1²), BatchNorm statistics around (0, 1), position biases N(0, 0.5²)."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

Spec = List[Tuple[str, Tuple[int, ...]]]


def _draw(name: str, shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    randn = torch.randn(shape, generator=g)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) * 1.5 + 0.5
    if name.endswith("running_mean"):
        return 0.1 * randn
    if "attention_biases" in name or "relative_position_bias_table" in name:
        return 0.5 * randn
    if name.endswith(".bias"):
        return 0.1 * randn
    if len(shape) == 1:   # BatchNorm / LayerNorm scale
        return 1.0 + 0.1 * randn
    return randn / math.sqrt(math.prod(shape[1:]))


def spec_of(state_dict: Dict[str, torch.Tensor], fixed: Tuple[str, ...] = ()) -> Tuple[Spec, Dict[str, torch.Tensor]]:
    """The (name, shape) list of the floating-point tensors to draw, and the rest (integer buffers and the
    names ending in one of ``fixed``) kept as they are."""
    spec, kept = [], {}
    for k, v in state_dict.items():
        if v.is_floating_point() and not k.endswith(fixed):
            spec.append((k, tuple(v.shape)))
        else:
            kept[k] = v.clone()
    return spec, kept


def draw_state_dict(spec: Spec, kept: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: _draw(name, tuple(shape), g) for name, shape in spec}
    out.update(kept)
    return out


def fingerprint(state_dict: Dict[str, torch.Tensor], names) -> torch.Tensor:
    """[n, 2] float64: sum and sum of squares of each named tensor (detects a generator that draws
    differently on another torch version)."""
    return torch.stack([torch.stack([state_dict[n].double().sum(), state_dict[n].double().square().sum()])
                        for n in names])
