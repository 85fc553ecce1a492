"""K-Medoids token clustering as Haurum et al. implement it ("Which Tokens to Use? Investigating Token
Reduction in Vision Transformers", ICCV-W 2023, Sec. 3.2; JoakimHaurum/TokenReduction
``models/kmedoids.py``, ``k_medoids_fit``).

Before each block in ``locations`` (see ``accel.reducers.clustering``), on the raw patch tokens:

- token weight ``w_j``: the attention the *previous* block paid to patch token j, summed over heads
  and queries (the column sums of its softmax matrix, [CLS] query included);
- ``D = cdist(x, x)`` (Euclidean); initial medoids: the ``K`` tokens of largest weight, in descending
  order;
- ``iters`` times (3 by default): assign each token to its nearest medoid, then move each medoid to
  the cluster member of lowest cost, all clusters from the same assignment;
- output: the medoid tokens themselves, in medoid order (no averaging). Gradients reach the
  backbone only through the kept tokens; there are no parameters.

Where the code differs from a textbook K-Medoids (followed here, as the code is what was trained):
the cost of a member i is ``w_i·Σ_j D_ij`` over *all* tokens j, not the distance sum within its
cluster; an empty cluster's medoid becomes token 0 (every cost is masked to the same value and the
argmin takes the first). Their ``equal_weight`` ablation (farthest-point start from a NumPy-random
token) is not offered. A location at block 0 has no previous attention and is refused.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.attention import AttnOut, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State
from accel.reducers.clustering import ClusterReducer
from accel.reducers.evo_core import gather_tokens

# The reference masks the cost rows of non-members with this value before summing a row.
_MASKED_ENTRY = 1e6


@torch.no_grad()
def k_medoids(x: torch.Tensor, weight: torch.Tensor, K: int, iters: int):
    """Medoid indices [B, K] and the final cluster of each token [B, n] for tokens ``x`` [B, n, C] with
    weights ``weight`` [B, n], batched (no loop over images or clusters)."""
    n = x.shape[1]
    dist = torch.cdist(x, x)
    cost = (dist * weight.unsqueeze(-1)).sum(dim=-1)                  # w_i · Σ_j D_ij, [B, n]
    masked = torch.full((), _MASKED_ENTRY * n, dtype=cost.dtype, device=cost.device)
    medoids = weight.unsqueeze(-1).topk(K, dim=1).indices.squeeze(-1)  # [B, K], largest weight first
    clusters = torch.arange(K, device=x.device)

    def nearest(medoids):
        return dist.gather(2, medoids.unsqueeze(1).expand(-1, n, -1)).argmin(dim=-1)

    for _ in range(iters):
        member = nearest(medoids).unsqueeze(-1) == clusters             # [B, n, K]
        medoids = torch.where(member, cost.unsqueeze(-1), masked).argmin(dim=1)
    return medoids, nearest(medoids)


def block_with_attention_mass(blk: nn.Module, x: torch.Tensor):
    """timm block ``blk`` on ``x`` with an explicit softmax matrix, and its column sums over heads and
    queries [B, N] (the attention each token receives: K-Medoids' token weights)."""
    attn = blk.attn
    h = blk.norm1(x)
    B, N, _ = h.shape
    q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = attn.attn_drop(((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1))
    out = attn.proj_drop(attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(B, N, -1))))
    x = mlp_residual(blk, attn_residual(blk, x, AttnOut(out, None, None)))
    return x, probs.detach().sum(dim=1).sum(dim=1)


class KMedoids(ClusterReducer):
    """K-Medoids token clustering (Haurum et al., ICCV-W 2023), as their code does it.

    Args:
        keep_rate: in (0, 1]; ``int(P·kr^(s+1))`` medoids at the s-th location.
        locations: 0-based blocks before which tokens are clustered (3, 6, 9 in the paper); not 0.
        iters: assignment/update rounds (their ``--cluster_iters``, 3).
    """

    label = "K-Medoids"

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), iters: int = 3) -> None:
        super().__init__(keep_rate, locations)
        self.iters = int(iters)

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        if 0 in self.locations:
            raise UserInputError(f"K-Medoids locations={list(self.locations)}: block 0 has no previous block whose "
                                 "attention weighs the tokens; expected locations of 1 or more.")
        for i in self.locations:
            check_plain_block(vit.blocks[i - 1], "K-Medoids")

    def cluster(self, stage, x, K, state):
        medoids, token_cluster = k_medoids(x, state["token_weight"], K, self.iters)
        return gather_tokens(x, medoids), token_cluster, medoids

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State):
        x = self.reduce(i, x, state)
        p = state["num_prefix"]
        if i + 1 not in self.locations or self.counts()[self.locations.index(i + 1)] >= x.shape[1] - p:
            return self.full_block(blk, x), state          # the next block clusters nothing: no weights needed
        x, mass = block_with_attention_mass(blk, x)
        state["token_weight"] = mass[:, p:]
        return x, state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iters={self.iters}"
