"""Evo-ViT: Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer", AAAI 2022
(Sec. 3.2 structure-preserving token selection with global class attention; Sec. 3.3 slow-fast
updating; Sec. 3.4 layer-to-stage training).

Global class attention: ``A = s`` (the [CLS] row summed over heads) in the blocks before ``start``,
then ``A ← (1−t)·A + t·s`` for the selected tokens only (t = 0.5), as YifanXu74/Evo-ViT
(deit/evo_deit.py) does. From ``start`` on, the top ``int(kr·n)`` patch tokens by ``A`` take the slow
path (the whole block); the others are placeholders. Re-selection happens at the first block of each
stage (stage-wise, inference and late training) or at every block (layer-wise, early training).

Placeholders: ``fast_path="none"`` keeps them unchanged, as the reference DeiT code does;
``fast_path="representative"`` is the paper's fast path (as in Evo-LeViT): the attention-weighted
mean of the placeholders goes through the stage's blocks as one extra token and its residual updates
are added to every placeholder when they rejoin. The classifier is the mean of all patch tokens →
final norm → head, plus an auxiliary [CLS] head in training (``Heads.aux_cls``; loss 0.5/0.5).

The token evolution itself (ranking, split, global attention update, rejoin, layer-to-stage mode)
is ``accel.reducers.evo_core``, shared with Evo-LeViT; this module fits it to timm's ViT blocks.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from accel.errors import UserInputError
from accel.heads import Heads
from accel.reducers import evo_core
from accel.reducers.attention import attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State, TokenReducer
from accel.reducers.selection import SlowFastTokens

FAST_PATHS = ("none", "representative")


class EvoViT(evo_core.LayerToStage, TokenReducer):
    """Evo-ViT slow-fast token evolution on a plain (non-distilled) timm ViT.

    Args:
        keep_rate: fraction of patch tokens on the slow path from ``start`` on (reference: 0.5).
        start: first block with token selection (reference: 4).
        stages: blocks where stage-wise selection re-ranks all tokens (reference: 4, 8).
        tradeoff: weight ``t`` of the new score in the global attention update (reference: 0.5).
        fast_path: ``"none"`` (reference DeiT code) or ``"representative"`` (paper, Evo-LeViT).
        layerwise_training: select at every block while training (the paper's first 200 epochs);
            the keep-rate/stage callback switches it off with ``set_layerwise(False)``.
        aux_cls_head: train an auxiliary [CLS] head (``reducer.head_cls``/``reducer.norm_cls``).
        explicit_attention: compute the full attention matrix as the reference code does.
    """

    label = "Evo-ViT"

    def __init__(self, keep_rate: float = 0.5, start: int = 4, stages: Sequence[int] = (4, 8), tradeoff: float = 0.5,
                 fast_path: str = "none", layerwise_training: bool = True, aux_cls_head: bool = True,
                 explicit_attention: bool = False) -> None:
        super().__init__(keep_rate, explicit_attention)
        if fast_path not in FAST_PATHS:
            raise UserInputError(f"Evo-ViT fast_path={fast_path!r} is unknown; expected one of {FAST_PATHS}.")
        self.start = int(start)
        self.stages = tuple(int(s) for s in stages)
        self.tradeoff = float(tradeoff)
        self.fast_path = fast_path
        self.layerwise = bool(layerwise_training)
        self.aux_cls_head = aux_cls_head
        self.head_cls: Optional[nn.Module] = None
        self.norm_cls: Optional[nn.Module] = None

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        depth = len(vit.blocks)
        if not 0 < self.start < depth:
            raise UserInputError(f"Evo-ViT start={self.start} is outside the model's {depth} blocks; expected 1…{depth - 1}.")
        if not self.stages or self.stages[0] != self.start or list(self.stages) != sorted(set(self.stages)) \
                or self.stages[-1] >= depth:
            raise UserInputError(f"Evo-ViT stages={list(self.stages)} must be increasing block indices below {depth} "
                                 f"starting at start={self.start}.")
        if getattr(vit, "cls_token", None) is None:
            raise UserInputError(f"Evo-ViT ranks tokens by [CLS] attention, but {type(vit).__name__} has no [CLS] token.")
        if vit.num_prefix_tokens != 1:
            raise UserInputError(f"Evo-ViT classifies from mean-pooled patch tokens and supports one prefix token "
                                 f"([CLS]); this model has {vit.num_prefix_tokens} (distilled DeiT?). Use deit_* .")
        for blk in vit.blocks:
            check_plain_block(blk, "Evo-ViT")
        if self.aux_cls_head and self.head_cls is None:
            dim = vit.num_features
            self.norm_cls = nn.LayerNorm(dim, eps=getattr(vit.norm, "eps", 1e-6))
            self.head_cls = nn.Linear(dim, vit.num_classes)
            nn.init.trunc_normal_(self.head_cls.weight, std=0.02)
            nn.init.zeros_(self.head_cls.bias)
        self.depth = depth

    # --- per forward ---------------------------------------------------------------------------
    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        state = super().reset(x, num_prefix)
        n = x.shape[1] - 1
        state.update(A=None, index=torch.arange(n, device=x.device).expand(x.shape[0], -1), parked=None, n_keep=n)
        return state

    def _stage_end(self, i: int) -> bool:
        later = [s for s in self.stages if s > i]
        return i + 1 == (later[0] if later else self.depth)

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        if i < self.start:
            a = attention(blk.attn, blk.norm1(x), cls_row=True, explicit=self.explicit_attention)
            # t = 1 before the first selection (the reference's tradeoff list), so A is this block's score.
            state["A"] = a.cls_attn[:, :, 1:].sum(dim=1)
            return mlp_residual(blk, attn_residual(blk, x, a)), state

        layerwise = self.selects_every_layer()
        if layerwise or i in self.stages:
            if state["parked"] is not None:  # re-attach before re-ranking everything
                x = evo_core.join(x, state["parked"])
            n_keep = int((x.shape[1] - 1) * self.keep_rate)
            x, state["parked"], state["A"], state["index"] = evo_core.split(
                x, state["A"], state["index"], n_keep, representative=self.fast_path == "representative")
            state["n_keep"] = n_keep
            self.record(state, SlowFastTokens(i, self.grid, kept=state["index"][:, :n_keep],
                                              global_attention=state["A"].detach(), source_index=state["index"]))

        n_keep = state["n_keep"]
        a = attention(blk.attn, blk.norm1(x), cls_row=True, explicit=self.explicit_attention)
        s = a.cls_attn[:, :, 1:1 + n_keep].sum(dim=1)  # summed over heads, as the reference DeiT code
        state["A"] = evo_core.update_global_attention(state["A"], s, self.tradeoff, n_keep)
        x = mlp_residual(blk, attn_residual(blk, x, a))

        if layerwise or self._stage_end(i):
            x = evo_core.join(x, state["parked"])
            state["parked"] = None
        return x, state

    def features(self, vit: nn.Module, x: torch.Tensor, state: State) -> torch.Tensor:
        # The final norm comes after pooling (norm of the patch-token mean), see ``head``.
        return x

    def head(self, vit: nn.Module, x: torch.Tensor, state: Optional[State], pre_logits: bool = False):
        feat = vit.norm(x[:, 1:].mean(dim=1))
        if pre_logits:
            return feat
        logits = vit.head(vit.head_drop(feat))
        if not self.training:
            return logits
        return Heads(logits, aux_cls=self.head_cls(self.norm_cls(x[:, 0])) if self.aux_cls_head else None)

    def extra_repr(self) -> str:
        return (f"keep_rate={self.keep_rate}, start={self.start}, stages={list(self.stages)}, tradeoff={self.tradeoff}, "
                f"fast_path={self.fast_path!r}, layerwise={self.layerwise}")
