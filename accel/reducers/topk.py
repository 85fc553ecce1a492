"""Top-K token pruning: at chosen blocks, keep the ``ceil(kr·n)`` image tokens that the [CLS] token
attends to most and drop the others. EViT (Liang et al., ICLR 2022, Sec. 3) without its
inattentive-token fusion — the plain pruning baseline that reducers are compared against."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from accel.errors import UserInputError
from accel.reducers.attention import attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import TokenReducer
from accel.reducers.evo_core import gather_tokens
from accel.reducers.selection import KeptTokens


class TopK(TokenReducer):
    """Keep the top ``ceil(keep_rate·n)`` image tokens by head-mean [CLS] attention after the
    attention of each block in ``locations`` (0-based); prefix tokens ([CLS], DIST) always stay."""

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9)) -> None:
        super().__init__(keep_rate)
        self.locations = tuple(int(i) for i in locations)

    def bind(self, vit) -> None:
        super().bind(vit)
        if getattr(vit, "cls_token", None) is None or not set(self.locations) <= set(range(len(vit.blocks))):
            raise UserInputError(f"Top-K locations={list(self.locations)}: expected a model with a [CLS] token and "
                                 f"0-based block indices below its {len(vit.blocks)} blocks.")
        for i in self.locations:
            check_plain_block(vit.blocks[i], "Top-K")

    def reset(self, x, num_prefix):
        state = super().reset(x, num_prefix)
        state["index"] = torch.arange(x.shape[1] - num_prefix, device=x.device).expand(x.shape[0], -1)
        return state

    def block(self, i, blk, x, state):
        p, keep = state["num_prefix"], math.ceil(self.keep_rate * (x.shape[1] - state["num_prefix"]))
        if i not in self.locations or keep >= x.shape[1] - p:
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
