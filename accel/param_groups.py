"""Optimizer parameter groups for networks with a learned token reducer: the reducer's parameters (those
under ``reducer.``, e.g. DynamicViT's predictors) at the full learning rate, the backbone's at a
fraction of it, and named parameters left out of training.

DynamicViT (Rao et al., NeurIPS 2021; raoyongming/DynamicViT optim_factory.py ``get_parameter_groups``)
fine-tunes the pretrained ViT at lr × 0.01 while its predictors learn at the full lr, keeps the
backbone at lr 0 for the first 5 epochs and never trains ``cls_token`` / ``pos_embed``; DiffRate
(Chen et al., ICCV 2023) trains only its rate parameters (backbone scale 0). The scale is written as
the group's ``lr_scale``, the key timm's schedulers multiply their value by.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import List, Sequence

import torch
from torch import nn

from accel.errors import UserInputError

#: Where a token-reducing network keeps its reducer's parameters (``accel.backbones.ReducedViT``).
REDUCER_PREFIX = "reducer."
#: The group key that says which part of the network a group trains (``"backbone"`` or ``"reducer"``).
PART = "part"


def is_reducer_parameter(name: str) -> bool:
    return name.startswith(REDUCER_PREFIX)


def freeze_parameters(net: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Stop training the parameters whose name matches one of ``patterns`` (a name, a dotted suffix
    such as ``cls_token``, or an fnmatch pattern); returns their names. A pattern that matches
    nothing is refused, so a typo cannot silently train what was meant to stay frozen."""
    names = [n for n, _ in net.named_parameters()]
    frozen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch(n, pattern) or fnmatch(n, "*." + pattern)]
        if not hits:
            raise UserInputError(f"module.frozen_parameters: {pattern!r} matches no parameter of "
                                 f"{type(net).__name__}; expected a parameter name such as 'cls_token' or 'pos_embed'.")
        frozen.extend(hits)
    params = dict(net.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def freeze_backbone(net: nn.Module) -> None:
    """Train only the reducer's parameters (backbone lr scale 0: DiffRate's frozen ViT)."""
    trainable = [n for n, p in net.named_parameters() if is_reducer_parameter(n) and p.requires_grad]
    if not trainable:
        raise UserInputError(f"module.backbone_lr_scale=0 freezes the backbone, but {type(net).__name__} has no "
                             "reducer parameters to train; expected a learned reducer (e.g. reducer=dynamicvit).")
    for name, p in net.named_parameters():
        if not is_reducer_parameter(name):
            p.requires_grad_(False)


def split_backbone_and_reducer(optimizer: torch.optim.Optimizer, net: nn.Module, backbone_lr_scale: float,
                               apply_scale: bool) -> torch.optim.Optimizer:
    """Split each of ``optimizer``'s groups (built by any factory, e.g. timm's weight-decay groups) into
    its backbone and reducer parameters, tagged ``part`` and with ``lr_scale`` (backbone: the scale,
    reducer: 1). ``apply_scale`` also multiplies the groups' current lr now, for runs without a timm
    scheduler (which otherwise applies ``lr_scale`` at every update)."""
    reducer_ids = {id(p) for n, p in net.named_parameters() if is_reducer_parameter(n)}
    groups = []
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for part, scale in (("backbone", float(backbone_lr_scale)), ("reducer", 1.0)):
            params = [p for p in group["params"] if (id(p) in reducer_ids) == (part == "reducer")]
            if params:
                lr = options["lr"] * scale if apply_scale else options["lr"]
                groups.append({**options, "params": params, "lr": lr, "lr_scale": scale, PART: part})
    # Before any step the optimizer holds no state, so its groups can be replaced as they are.
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer


def zero_backbone_lr(optimizer: torch.optim.Optimizer) -> None:
    """Backbone groups at lr 0 for this step (DynamicViT's ``fix_step`` warm-up: the optimizer still
    keeps its moments of the backbone, only the update is zero)."""
    for group in optimizer.param_groups:
        if group.get(PART) == "backbone":
            group["lr"] = 0.0
