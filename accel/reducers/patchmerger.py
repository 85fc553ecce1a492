"""PatchMerger as Haurum et al. implement it ("Which Tokens to Use? Investigating Token Reduction in Vision
Transformers", ICCV-W 2023, Sec. 3.2; JoakimHaurum/TokenReduction ``models/patchmerger.py``), after
Renggli et al., "Learning to Merge Tokens in Vision Transformers" (2022).

Before each block in ``locations`` (see ``accel.reducers.clustering``) the patch tokens x are replaced by
``softmax_j(Q·LN(x)_jᵀ·s)·LN(x)``: ``K`` learned queries ``Q`` [K, C] (initialised ``randn``), a fresh
LayerNorm (eps 1e-5) per location, both under ``reducer.cluster_layers.<s>``. As in the code:

- ``s = 1`` (their ``scaled_attention=False``); ``scaled=True`` gives ``1/√C``;
- the outputs are mixtures of *normalised* tokens and replace the residual stream; [CLS] is untouched;
- K is fixed by the queries, so the keep rate cannot change after construction (a schedule is refused).

The recorded cluster of a token is the query that weighs it most (their hard assignment map).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.base import check_keep_rate
from accel.reducers.clustering import ClusterReducer


class MergerLayer(nn.Module):
    """``K`` learned queries attending over the LayerNorm-ed tokens (one PatchMerger)."""

    def __init__(self, dim: int, num_tokens: int, scaled: bool = False) -> None:
        super().__init__()
        self.scale = dim ** -0.5 if scaled else 1.0
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_tokens, dim))

    def forward(self, x: torch.Tensor):
        x = self.norm(x)
        weights = (torch.matmul(self.queries, x.transpose(-1, -2)) * self.scale).softmax(dim=-1)   # [B, K, n]
        return torch.matmul(weights, x), weights


class PatchMerger(ClusterReducer):
    """PatchMerger token merging (Haurum et al., ICCV-W 2023), as their code does it.

    Args:
        keep_rate: in (0, 1]; ``int(P·kr^(s+1))`` output tokens (queries) at the s-th location, fixed.
        locations: 0-based blocks before which tokens are merged (3, 6, 9 in the paper).
        scaled: scale the query-token products by ``1/√C`` (their code: no scale).
    """

    label = "PatchMerger"

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), scaled: bool = False) -> None:
        super().__init__(keep_rate, locations)
        self.scaled = bool(scaled)

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        self.cluster_layers = nn.ModuleList(MergerLayer(self.embed_dim, K, self.scaled) for K in self.counts())

    def set_keep_rate(self, keep_rate: float) -> None:
        value = check_keep_rate(keep_rate)
        layers = getattr(self, "cluster_layers", None)
        if layers is not None and self.counts(value) != [m.queries.shape[0] for m in layers]:
            raise UserInputError(f"PatchMerger learns one query per output token ({[m.queries.shape[0] for m in layers]} "
                                 f"at keep_rate={self.keep_rate}), so keep_rate={keep_rate!r} cannot be set after "
                                 "construction; expected the same keep rate (build a new model for another).")
        super().set_keep_rate(value)

    def cluster(self, stage, x, K, state):
        tokens, weights = self.cluster_layers[stage](x)
        return tokens, weights.argmax(dim=1), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaled={self.scaled}"
