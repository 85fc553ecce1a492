"""Token clustering before chosen blocks, the common frame of Haurum et al.'s clustering reducers
("Which Tokens to Use? Investigating Token Reduction in Vision Transformers", ICCV-W 2023, Sec. 3;
JoakimHaurum/TokenReduction ``models/kmedoids.py``, ``dpcknn.py``, ``patchmerger.py``).

Before each block in ``locations`` the image tokens (the raw residual stream, prefix tokens apart)
are replaced by ``K = int(P·kr^(s+1))`` cluster tokens at the s-th location, P being the model's
original patch count (cumulative, int truncation: DeiT-S at kr 0.7 keeps 137, 96, 67); [CLS] and
DIST are carried unchanged in front. A location whose K is not below the current token count
leaves the tokens alone, so keep rate 1 gives timm's logits (the reference would still cluster).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.base import State, TokenReducer
from accel.reducers.selection import ClusteredTokens
from accel.reducers.topk import cumulative_count


class ClusterReducer(TokenReducer):
    """Replace the image tokens by ``K`` cluster tokens before each block in ``locations``.

    Subclasses implement ``cluster(stage, x, K, state)`` → ``(tokens [B, K, C], token_cluster [B, n],
    centers [B, K] or None)``: the new tokens, the cluster of each input token and, where the method
    has them, the input token each cluster is centred on."""

    label = "clustering"

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9)) -> None:
        super().__init__(keep_rate)
        self.locations = tuple(int(i) for i in locations)

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        depth = len(vit.blocks)
        if not self.locations or not set(self.locations) <= set(range(depth)):
            raise UserInputError(f"{self.label} locations={list(self.locations)}: expected 0-based block indices "
                                 f"below the model's {depth} blocks.")
        self.embed_dim = int(vit.embed_dim)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def counts(self, keep_rate: Optional[float] = None) -> List[int]:
        """Cluster tokens after each location (``int(P·kr^(s+1))``)."""
        kr = self.keep_rate if keep_rate is None else keep_rate
        return [cumulative_count(self.num_patches, kr, s) for s in range(len(self.locations))]

    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        state = super().reset(x, num_prefix)
        # For each patch of the grid, the current image token that holds it.
        state["assignment"] = torch.arange(x.shape[1] - num_prefix, device=x.device).expand(x.shape[0], -1)
        return state

    def cluster(self, stage: int, x: torch.Tensor, K: int, state: State
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Each subclass's method (K-Medoids, DPC-KNN, PatchMerger): the ``K`` new image tokens from the
        image tokens ``x`` at location ``stage``, with the assignment and extra record its selection
        draws; the frame has no clustering of its own."""
        raise NotImplementedError(f"{type(self).__name__} does not define cluster().")

    def reduce(self, i: int, x: torch.Tensor, state: State) -> torch.Tensor:
        """The tokens block ``i`` gets: clustered if ``i`` is a location that lowers the count."""
        p = state["num_prefix"]
        if i not in self.locations:
            return x
        stage = self.locations.index(i)
        K = self.counts()[stage]
        if K >= x.shape[1] - p:
            return x
        tokens, token_cluster, centers = self.cluster(stage, x[:, p:], K, state)
        assignment = token_cluster.gather(1, state["assignment"])
        self.record(state, ClusteredTokens(i, self.grid, token_cluster=token_cluster.detach(),
                                           centers=None if centers is None else centers.detach(),
                                           assignment=assignment.detach()))
        state["assignment"] = assignment
        return torch.cat([x[:, :p], tokens], dim=1)

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        return self.full_block(blk, self.reduce(i, x, state)), state

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, locations={list(self.locations)}"
