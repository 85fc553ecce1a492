"""EViT: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022 (Sec. 3: attentive token identification and inattentive token fusion).

At chosen blocks, after the attention residual and before the MLP, keep the ``ceil(kr·n)`` image
tokens the [CLS] token attends to most (attention averaged over heads; ``n`` counts the current
non-prefix tokens, an earlier fused token included), in descending score order, and optionally fuse
the rest into one token ``Σ a_j x_j`` with the raw attention weights, appended last — as
youweiliang/evit does. Prefix tokens ([CLS], DIST) are never dropped.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.attention import attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State, TokenReducer
from accel.reducers.selection import KeptTokens


class EViT(TokenReducer):
    """EViT token reorganisation (keep attentive tokens, fuse inattentive ones).

    Args:
        keep_rate: fraction of the current image tokens kept at each location, in (0, 1].
        locations: 0-based block indices where tokens are reduced (EViT: 3, 6, 9 for 12 blocks).
        fuse_token: fuse the dropped tokens into one (EViT's inattentive-token fusion).
        explicit_attention: compute the full attention matrix as the reference code does.
    """

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), fuse_token: bool = True,
                 explicit_attention: bool = False) -> None:
        super().__init__(keep_rate, explicit_attention)
        self.locations = tuple(int(i) for i in locations)
        self.fuse_token = fuse_token

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        depth = len(vit.blocks)
        bad = [i for i in self.locations if not 0 <= i < depth]
        if bad:
            raise UserInputError(f"EViT locations {list(self.locations)} include {bad[0]}, outside the model's "
                                 f"{depth} blocks; expected 0-based indices in [0, {depth - 1}].")
        if getattr(vit, "cls_token", None) is None:
            raise UserInputError(f"EViT scores tokens by [CLS] attention, but {type(vit).__name__} has no [CLS] "
                                 "token; use ToMe for models without one.")
        for i in self.locations:
            check_plain_block(vit.blocks[i], "EViT")

    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        state = super().reset(x, num_prefix)
        # Original patch index of every current image token (-1 for a fused token), for logging.
        state["index"] = torch.arange(x.shape[1] - num_prefix, device=x.device).expand(x.shape[0], -1)
        return state

    def kept_count(self, n: int) -> int:
        return math.ceil(self.keep_rate * n)

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        p = state["num_prefix"]
        n = x.shape[1] - p
        keep = self.kept_count(n)
        if i not in self.locations or keep >= n:
            return self.full_block(blk, x), state
        a = attention(blk.attn, blk.norm1(x), cls_row=True, explicit=self.explicit_attention)
        x = attn_residual(blk, x, a)
        scores = a.cls_attn[:, :, p:].mean(dim=1)                       # [B, n]
        top, idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True)
        tokens = x[:, p:]
        kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        parts = [x[:, :p], kept]
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, False)
        if self.fuse_token:
            weights = (scores * dropped).unsqueeze(1)                  # raw attention, not renormalised
            parts.append(torch.bmm(weights, tokens))
        x = torch.cat(parts, dim=1)
        index = state["index"].gather(1, idx)
        self.record(state, KeptTokens(i, self.grid, kept=index, scores=scores.detach(), source_index=state["index"]))
        if self.fuse_token:
            index = torch.cat([index, index.new_full((index.shape[0], 1), -1)], dim=1)
        state["index"] = index
        return mlp_residual(blk, x), state

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, locations={list(self.locations)}, fuse_token={self.fuse_token}"
