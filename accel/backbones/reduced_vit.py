"""Run a timm VisionTransformer block by block with a token reducer deciding what each block sees.

The timm model is not copied: its modules are used as they are, and the wrapper's state dict has
exactly timm's keys, so plain timm/DeiT checkpoints load unchanged (reducer-owned parameters, if a
method needs any, live under ``reducer.``).
"""
from __future__ import annotations

from typing import Set

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from accel.errors import UserInputError
from accel.reducers.base import TokenReducer

_OWN = ("vit", "reducer")


class ReducedViT(nn.Module):
    """A timm ``VisionTransformer`` (DeiT, distilled DeiT, ViT) whose blocks run through a
    ``TokenReducer`` (EViT, Evo-ViT, ToMe, or the identity)."""

    def __init__(self, vit: VisionTransformer, reducer: TokenReducer) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise UserInputError(f"Cannot reduce tokens of a {type(vit).__name__}; expected a timm VisionTransformer.")
        self.vit = vit
        self.reducer = reducer
        reducer.bind(vit)
        self._register_state_dict_hook(_strip_vit_prefix)
        self._register_load_state_dict_pre_hook(_add_vit_prefix)

    # The named surface callbacks use.
    def set_keep_rate(self, keep_rate: float) -> None:
        self.reducer.set_keep_rate(keep_rate)

    @property
    def keep_rate(self) -> float:
        return self.reducer.keep_rate

    @property
    def last_selection(self):
        return self.reducer.last_selection

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    def no_weight_decay(self) -> Set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def set_distilled_training(self, enable: bool = True) -> None:
        if not hasattr(self.vit, "set_distilled_training"):
            raise UserInputError(f"{type(self.vit).__name__} has no distillation head; use a distilled DeiT.")
        self.vit.set_distilled_training(enable)

    def forward_features(self, x: torch.Tensor):
        """Tokens after the last block (before the final norm) and the reducer's state."""
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        state = self.reducer.reset(x, vit.num_prefix_tokens)
        for i, blk in enumerate(vit.blocks):
            x, state = self.reducer.block(i, blk, x, state)
        return x, state

    def forward(self, x: torch.Tensor):
        x, state = self.forward_features(x)
        return self.reducer.head(self.vit, x, state)


def with_reducer(vit: VisionTransformer, reducer: TokenReducer) -> ReducedViT:
    """One line to make any timm ViT token-reducing: ``with_reducer(timm_model, EViT(keep_rate=0.7))``."""
    return ReducedViT(vit, reducer)


def _strip_vit_prefix(module, state_dict, prefix, local_metadata):
    for key in list(state_dict):
        if key.startswith(prefix + "vit."):
            state_dict[prefix + key[len(prefix) + 4:]] = state_dict.pop(key)
    return state_dict


def _add_vit_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in list(state_dict):
        if key.startswith(prefix) and not key[len(prefix):].startswith(tuple(o + "." for o in _OWN)):
            state_dict[prefix + "vit." + key[len(prefix):]] = state_dict.pop(key)
