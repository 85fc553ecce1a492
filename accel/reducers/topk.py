"""Top-K token pruning: at chosen blocks, after the attention residual and before the MLP, keep the
image tokens that the [CLS] token attends to most and drop the others. EViT (Liang et al., ICLR 2022,
Sec. 3) without its inattentive-token fusion — the plain pruning baseline of Haurum et al., "Which
Tokens to Use? Investigating Token Reduction in Vision Transformers" (ICCV-W 2023, Sec. 3).

How many are kept follows JoakimHaurum/TokenReduction (``models/topk.py``, ``train.py``) by default:
at the s-th location (0-based) ``int(P·kr^(s+1))`` of the model's P original patches, cumulative, int
truncation (DeiT-S at kr 0.7: 137, 96, 67). Their code counts P as 14·14 whatever the model; here it
is the model's own patch grid. ``cumulative=False`` keeps EViT's ``ceil(kr·n)`` of the current n
instead (then equal to ``evit`` with ``fuse_token=false``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from accel.errors import UserInputError
from accel.reducers.attention import attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import TokenReducer
from accel.reducers.evo_core import gather_tokens
from accel.reducers.selection import KeptTokens


def cumulative_count(num_patches: int, keep_rate: float, stage: int) -> int:
    """Tokens left after the ``stage``-th (0-based) reduction in Haurum et al.'s code: ``int(P·kr^(s+1))``
    of the ``P`` original patches (train.py expands one keep rate so), at least 1 (their code asserts)."""
    return max(1, int(num_patches * keep_rate ** (stage + 1)))


class TopK(TokenReducer):
    """Keep the top image tokens by head-mean [CLS] attention after the attention of each block in
    ``locations`` (0-based), in descending score order; prefix tokens ([CLS], DIST) always stay.

    Args:
        keep_rate: in (0, 1]; see ``cumulative``.
        locations: 0-based block indices where tokens are dropped (Haurum et al. and EViT: 3, 6, 9).
        cumulative: keep ``int(P·kr^(s+1))`` of the P patches at the s-th location (Haurum et al.'s
            code, the default), or ``ceil(kr·n)`` of the current n (EViT's rule) when False.
    """

    label = "Top-K"

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), cumulative: bool = True) -> None:
        super().__init__(keep_rate)
        self.locations = tuple(int(i) for i in locations)
        self.cumulative = bool(cumulative)

    def bind(self, vit) -> None:
        super().bind(vit)
        if getattr(vit, "cls_token", None) is None or not set(self.locations) <= set(range(len(vit.blocks))):
            raise UserInputError(f"Top-K locations={list(self.locations)}: expected a model with a [CLS] token and "
                                 f"0-based block indices below its {len(vit.blocks)} blocks.")
        for i in self.locations:
            check_plain_block(vit.blocks[i], "Top-K")

    def kept_count(self, i: int, n: int) -> int:
        """Image tokens kept at block ``i`` (a location) out of the current ``n``."""
        if self.cumulative:
            return cumulative_count(self.grid[0] * self.grid[1], self.keep_rate, self.locations.index(i))
        return math.ceil(self.keep_rate * n)

    def reset(self, x, num_prefix):
        state = super().reset(x, num_prefix)
        state["index"] = torch.arange(x.shape[1] - num_prefix, device=x.device).expand(x.shape[0], -1)
        return state

    def block(self, i, blk, x, state):
        p, n = state["num_prefix"], x.shape[1] - state["num_prefix"]
        keep = self.kept_count(i, n) if i in self.locations else n
        if keep >= n:
            return self.full_block(blk, x), state
        a = attention(blk.attn, blk.norm1(x), cls_row=True)
        x = attn_residual(blk, x, a)
        scores = a.cls_attn[:, :, p:].mean(dim=1)                       # [B, n], one per image token
        idx = scores.topk(keep, dim=1).indices                          # descending score
        x = torch.cat([x[:, :p], gather_tokens(x[:, p:], idx)], dim=1)
        kept = state["index"].gather(1, idx)
        self.record(state, KeptTokens(i, self.grid, kept=kept, scores=scores.detach(), source_index=state["index"]))
        state["index"] = kept
        return mlp_residual(blk, x), state

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, locations={list(self.locations)}, cumulative={self.cumulative}"
