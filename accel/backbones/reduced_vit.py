"""Run a timm VisionTransformer block by block with a token reducer deciding what each block sees.

The timm model is not copied: its modules are used as they are, and the wrapper's state dict has
exactly timm's keys, so plain timm/DeiT checkpoints load unchanged (reducer-owned parameters, if a
method needs any, live under ``reducer.``).
"""
from __future__ import annotations

from typing import List, Optional, Set, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from accel.errors import UserInputError
from accel.heads import Distillable, Heads
from accel.reducers.base import State, TokenReducer
from accel.reducers.protocol import RecordsSelections
from accel.reducers.selection import Selection

_OWN = ("vit", "reducer")


class ReducedViT(RecordsSelections, nn.Module):
    """A timm ``VisionTransformer`` (DeiT, distilled DeiT, ViT) whose blocks run through a
    ``TokenReducer`` (EViT, Evo-ViT, ToMe, Top-K, or the identity).

    A token-reducing network (``accel.reducers.protocol.TokenReducingNet``). As timm's ViT,
    ``forward(x) == forward_head(forward_features(x))`` with ``forward_features`` returning the
    tokens after the final norm (Evo-ViT: before it, as it norms the pooled mean);
    ``set_grad_checkpointing()`` re-computes each block in the backward pass instead of storing
    its activations.
    """

    def __init__(self, vit: VisionTransformer, reducer: TokenReducer) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise UserInputError(f"Cannot reduce tokens of a {type(vit).__name__}; expected a timm VisionTransformer.")
        self.vit = vit
        self.reducer = reducer
        reducer.bind(vit)
        self.grad_checkpointing = False
        self._selections: List[Selection] = []
        # The reducer's state from forward_features to forward_head of the same forward.
        self._state: Optional[State] = None
        self._register_state_dict_hook(_strip_vit_prefix)
        self._register_load_state_dict_pre_hook(_add_vit_prefix)

    # --- the token-reducing surface (accel.reducers.protocol.TokenReducingNet) ------------------
    def set_keep_rate(self, keep_rate: float) -> None:
        self.reducer.set_keep_rate(keep_rate)

    @property
    def keep_rate(self) -> float:
        return self.reducer.keep_rate

    @property
    def layerwise(self) -> Optional[bool]:
        """Evo-ViT's selection mode in training (True layer-wise, False stage-wise); None for
        reducers that have none."""
        return self.reducer.layerwise

    def set_layerwise(self, enable: bool) -> None:
        """Switch Evo-ViT's selection mode; a reducer without one raises UserInputError."""
        self.reducer.set_layerwise(enable)

    @property
    def tracing(self) -> bool:
        return self.reducer.tracing

    def set_tracing(self, enable: bool) -> None:
        self.reducer.set_tracing(enable)

    @property
    def grid(self) -> Tuple[int, int]:
        """The patch grid (rows, cols)."""
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    def no_weight_decay(self) -> Set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return the distillation head apart (``Heads.dist``) in training (a distilled DeiT only)."""
        if not isinstance(self.vit, Distillable):
            raise UserInputError(f"Distillation needs a student with a distillation head, but {type(self.vit).__name__} "
                                 "has none; use a distilled model (e.g. model=deit_s_distilled).")
        self.vit.set_distilled_training(enable)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Re-compute each block (with its token reduction) in the backward pass instead of
        keeping its activations: less memory for one more forward of the blocks."""
        self.grad_checkpointing = bool(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens after the last block, as the reducer leaves them (timm: after the final norm)."""
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        state = self.reducer.reset(x, vit.num_prefix_tokens)
        for i, blk in enumerate(vit.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, state = checkpoint(self._block, i, blk, x, state, use_reentrant=False)
            else:
                x, state = self.reducer.block(i, blk, x, state)
        self._selections = list(state["selections"])
        self._state = state
        return self.reducer.features(vit, x, state)

    def _block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State):
        # A copy: the re-run in the backward pass must start from the state this call started from.
        return self.reducer.block(i, blk, x, dict(state))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Logits from ``forward_features``' tokens in eval mode; ``Heads`` in training (Evo-ViT's
        auxiliary head, a distilled DeiT's distillation head in distilled training, and the
        reducer's ``training_losses``)."""
        state, self._state = self._state, None
        out = self.reducer.head(self.vit, x, state, pre_logits=pre_logits)
        if not self.training or pre_logits:
            return out
        losses = self.reducer.training_losses(state) if state is not None else {}
        return Heads.of(out).with_losses(losses) if losses else Heads.of(out)

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))


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
