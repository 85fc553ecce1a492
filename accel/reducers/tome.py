"""ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (Sec. 3: bipartite soft
matching on attention keys, size-weighted merging, proportional attention).

In every block with ``r > 0``, after the attention residual and before the MLP, tokens are split
alternately into sets A and B; each A token's most similar B token (cosine similarity of the
head-averaged keys) is found, and the ``r`` most similar pairs are merged by a size-weighted average
— as facebookresearch/ToMe (tome/merge.py, tome/patch/timm.py) does. [CLS] is never merged away
and a DIST token is never a merge target. Proportional attention adds ``log(size)`` to the logits.

How many tokens merge is set either by ``r`` (the paper's knob) or, with ``r=None``, by the
project-wide ``keep_rate``: the fraction of image tokens left after the last block, reached by a
near-constant r over the blocks. The two never combine: an explicit ``r`` with a keep rate below 1
is refused, so a keep-rate schedule or search cannot silently leave ``r`` in charge.
"""
from __future__ import annotations

import math
from collections.abc import Sequence as SequenceABC
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.attention import attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State, TokenReducer, TracesSources, check_keep_rate
from accel.reducers.selection import MergedTokens

RSpec = Union[int, Sequence[int], Tuple[int, float]]


def parse_r(depth: int, r: RSpec) -> List[int]:
    """Per-block r from an int (constant), a list (explicit, padded with 0) or ``(r, inflection)``
    (ToMe's linear ramp: -1 decreasing, 0 constant, +1 increasing; total ≈ depth·r)."""
    inflect = 0.0
    if isinstance(r, SequenceABC) and not isinstance(r, str):
        r = list(r)  # a Hydra ListConfig as a plain list
    if isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], float):
        r, inflect = r
    elif isinstance(r, (list, tuple)):
        if len(r) > depth:
            raise UserInputError(f"ToMe r={list(r)} has {len(r)} entries; expected at most one per block ({depth}).")
        return [int(v) for v in r] + [0] * (depth - len(r))  # missing blocks merge nothing
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (depth - 1)
    return [int(min_val + step * i) for i in range(depth)]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool, protect_dist: bool):
    """The merge plan for ``r`` tokens: (unmerged A indices, merged A indices, their B destinations).

    ``metric`` [B, N, D]. A = even positions, B = odd positions. Returns the index tensors and the
    DIST flag that ``merge`` uses; the output order is [unmerged A (original order), all of B], with
    DIST (B's first token) moved right after [CLS] as the reference does, so that prefix tokens stay
    at positions 0 and 1 for the distillation head."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if protect_cls:
            scores[..., 0, :] = -math.inf
        if protect_dist:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if protect_cls:
            unm_idx = unm_idx.sort(dim=1)[0]
    return unm_idx, src_idx, dst_idx, protect_dist


def merge(x: torch.Tensor, plan, mode: str = "sum") -> torch.Tensor:
    """Apply a matching plan to ``x`` [B, N, C]: sources are reduced into their destinations."""
    unm_idx, src_idx, dst_idx, protect_dist = plan
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - src_idx.shape[1], c))
    src = src.gather(dim=-2, index=src_idx.expand(n, src_idx.shape[1], c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, src_idx.shape[1], c), src, reduce=mode)
    if protect_dist:  # [CLS] is unm[:, 0] (sorted first) and DIST is dst[:, 0]: keep them as the prefix
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


class ToMe(TracesSources, TokenReducer):
    """Token merging with bipartite soft matching.

    Args:
        r: tokens merged per block: int, per-block list, or ``(r, inflection)``; ``None`` derives a
            near-constant r from ``keep_rate``.
        keep_rate: with ``r=None``, the fraction of image tokens left after the last block (1.0 =
            no merging); ``set_keep_rate`` changes it at run time (keep-rate schedules). With an
            explicit ``r`` it must be 1.0.
        prop_attn: proportional attention (log size added to the attention logits).
        trace_source: keep, per token, which input patches it holds (for visualisation).
        explicit_attention: compute the full attention matrix as the reference code does.
    """

    knob = "r"

    def __init__(self, r: Optional[RSpec] = 13, keep_rate: float = 1.0, prop_attn: bool = True,
                 trace_source: bool = False, explicit_attention: bool = False) -> None:
        super().__init__(keep_rate, explicit_attention)
        self.r = r
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.depth = 0
        self._refuse_explicit_r(self.keep_rate)

    def _refuse_explicit_r(self, keep_rate: float) -> None:
        if self.r is not None and keep_rate != 1.0:
            raise UserInputError(f"ToMe got both r={self.r!r} and keep_rate={keep_rate}, but an explicit r fixes how "
                                 "many tokens merge; set reducer.r=null (r=None) to derive r from keep_rate, or "
                                 "keep_rate=1.0 to merge r tokens per block.")

    def set_keep_rate(self, keep_rate: float) -> None:
        """With ``r=None``: merge so that ``keep_rate`` of the image tokens are left after the last
        block. With an explicit ``r``: 1.0 is accepted and changes nothing; anything else is refused."""
        value = check_keep_rate(keep_rate)
        self._refuse_explicit_r(value)
        super().set_keep_rate(value)
        if self.depth:  # bound to a model: the schedule follows the new keep rate from the next forward
            self._schedule = self._make_schedule()

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        self.depth = len(vit.blocks)
        self.num_prefix = vit.num_prefix_tokens
        self.num_patches = self.grid[0] * self.grid[1]
        for blk in vit.blocks:
            check_plain_block(blk, "ToMe")
        self._schedule = self._make_schedule()

    def _make_schedule(self) -> List[int]:
        removed = 0
        if self.r is None:
            removed = int(round((1.0 - self.keep_rate) * self.num_patches))
            schedule = [removed // self.depth + (1 if i < removed % self.depth else 0) for i in range(self.depth)]
        else:
            schedule = parse_r(self.depth, self.r)
        bad = [v for v in schedule if v < 0]
        if bad:
            raise UserInputError(f"ToMe r={self.r!r} gives a negative r ({bad[0]}); expected r ≥ 0.")
        n = self.num_patches + self.num_prefix
        first_possible = (n - self.num_prefix) // 2
        if max(schedule, default=0) > first_possible:
            raise UserInputError(f"ToMe r={self.r!r} asks a block to merge {max(schedule)} tokens but at most "
                                 f"{first_possible} can be merged at once ({n} tokens); expected a smaller r.")
        # As the reference: once tokens run out, later blocks merge only what is left to merge.
        for i, v in enumerate(schedule):
            schedule[i] = min(v, (n - self.num_prefix) // 2)
            n -= schedule[i]
        if self.r is None and sum(schedule) < removed:
            raise UserInputError(f"ToMe keep_rate={self.keep_rate} needs {removed} of {self.num_patches} image tokens "
                                 f"merged, but r spread over {self.depth} blocks merges at most {sum(schedule)}; "
                                 "expected a larger keep_rate.")
        return schedule

    @property
    def schedule(self) -> List[int]:
        """Tokens merged in each block."""
        return list(self._schedule)

    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        state = super().reset(x, num_prefix)
        state["size"] = None
        if self.trace_source:
            b, n = x.shape[:2]
            state["source"] = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
        return state

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        r = self._schedule[i]
        size = state["size"]
        bias = size.log().transpose(1, 2).unsqueeze(1) if (self.prop_attn and size is not None) else None
        if r <= 0 and bias is None:
            return self.full_block(blk, x), state
        a = attention(blk.attn, blk.norm1(x), bias=bias, mean_keys=r > 0, explicit=self.explicit_attention)
        x = attn_residual(blk, x, a)
        if r > 0:
            plan = bipartite_soft_matching(a.keys, r, protect_cls=state["num_prefix"] >= 1,
                                           protect_dist=state["num_prefix"] >= 2)
            if size is None:
                # Token counts in float32 whatever the activations' dtype: bfloat16 holds integers
                # exactly only up to 256, and a merged token can hold more input tokens than that.
                size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
            merged_size = merge(size, plan)
            x = (merge(x * size, plan) / merged_size).to(x.dtype)  # size-weighted average
            state["size"] = size = merged_size
            if self.trace_source:
                state["source"] = merge(state["source"], plan, mode="amax")
            self.record(state, MergedTokens(i, self.grid, size=size.detach(), source=state.get("source"),
                                            num_prefix=state["num_prefix"]))
        return mlp_residual(blk, x), state

    def extra_repr(self) -> str:
        return f"r={self.r!r}, keep_rate={self.keep_rate}, prop_attn={self.prop_attn}, trace_source={self.trace_source}"
