"""DPC-KNN token clustering and merging as Haurum et al. implement it ("Which Tokens to Use?
Investigating Token Reduction in Vision Transformers", ICCV-W 2023, Sec. 3.2; JoakimHaurum/TokenReduction
``models/dpcknn.py``, taken from TCFormer's ``cluster_dpc_knn`` and ``merge_tokens``, Zeng et al., CVPR 2022).

Before each block in ``locations`` (see ``accel.reducers.clustering``), on the raw patch tokens x:

- clustering, without gradients: ``D = cdist(x, x)/√C``; local density
  ``ρ_i = exp(−mean of D² to the k nearest tokens, i itself included)`` plus ``1e-6·U(0, 1)`` noise drawn
  from the global RNG (their tie-breaker, kept: a seeded run draws the same noise as theirs);
  ``δ_i`` = distance to the nearest denser token (the image's largest distance for the densest);
  centres: the ``K`` tokens of largest ``δ·ρ``, in descending order; each token joins its nearest
  centre, and a centre always its own cluster;
- merging, learned: weights ``w_i = exp(Linear_{C→1}(x_i))`` (one score layer per location, under
  ``reducer.cluster_layers.<s>.score``), cluster token ``Σ_{i∈c} w_i x_i / (Σ_{i∈c} w_i + 1e-6)``.
  The gradient reaches the score layer through ``w``.

``equal_weight=True`` is their ablation with ``w = 1`` (no score layer). The code's normalisation of the
aggregation weights (TCFormer's ``agg_weight``) discards its result and changes nothing, so it is left out.
The paper's method is the code's; nothing else differs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from accel.reducers.clustering import ClusterReducer


@torch.no_grad()
def dpc_knn(x: torch.Tensor, K: int, k: int):
    """Centre indices [B, K] (descending ``δ·ρ``) and the cluster of each token [B, n] for ``x`` [B, n, C]."""
    B, n, C = x.shape
    dist = torch.cdist(x, x) / C ** 0.5
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    denser = density.unsqueeze(1) > density.unsqueeze(2)                # [b, i, j]: ρ_j > ρ_i
    farthest = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, dist, farthest).min(dim=-1).values
    centers = (delta * density).topk(K, dim=-1).indices
    token_cluster = dist.gather(1, centers.unsqueeze(-1).expand(-1, -1, n)).argmin(dim=1)
    token_cluster.scatter_(1, centers, torch.arange(K, device=x.device).expand(B, -1))
    return centers, token_cluster


class WeightedMerge(nn.Module):
    """Merge tokens into clusters by ``exp(score)``-weighted average (DPC-KNN's ``merge_tokens`` with
    the learned token score; plain averages with ``equal_weight``)."""

    def __init__(self, dim: int, equal_weight: bool = False) -> None:
        super().__init__()
        self.score = None if equal_weight else nn.Linear(dim, 1)
        if self.score is not None:   # timm's ViT init, as the reference model applies it to its new modules
            trunc_normal_(self.score.weight, std=0.02)
            nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor, token_cluster: torch.Tensor, K: int) -> torch.Tensor:
        B, n, C = x.shape
        weight = x.new_ones(B, n, 1) if self.score is None else self.score(x).exp()
        index = token_cluster.unsqueeze(-1)
        total = weight.new_zeros(B, K, 1).scatter_add(1, index, weight) + 1e-6
        source = x * (weight / total.gather(1, index))
        return x.new_zeros(B, K, C).scatter_add(1, index.expand(-1, -1, C), source)


class DPCKNN(ClusterReducer):
    """DPC-KNN token merging (Haurum et al., ICCV-W 2023; TCFormer's clustering), as their code does it.

    Args:
        keep_rate: in (0, 1]; ``int(P·kr^(s+1))`` clusters at the s-th location.
        locations: 0-based blocks before which tokens are merged (3, 6, 9 in the paper).
        k_neighbors: neighbours of the local density (their ``--k_neighbors``, 5).
        equal_weight: average cluster members with equal weights instead of the learned score.
    """

    label = "DPC-KNN"

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), k_neighbors: int = 5,
                 equal_weight: bool = False) -> None:
        super().__init__(keep_rate, locations)
        self.k_neighbors = int(k_neighbors)
        self.equal_weight = bool(equal_weight)

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        self.cluster_layers = nn.ModuleList(WeightedMerge(self.embed_dim, self.equal_weight) for _ in self.locations)

    def cluster(self, stage, x, K, state):
        centers, token_cluster = dpc_knn(x, K, min(self.k_neighbors, x.shape[1]))
        return self.cluster_layers[stage](x, token_cluster, K), token_cluster, centers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_neighbors={self.k_neighbors}, equal_weight={self.equal_weight}"
