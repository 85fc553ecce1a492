"""What a token-reducing network decided in its last forward, one typed record per reducing block.

Each kind of decision has its own dataclass, so that logging and pictures dispatch on the type:

* ``KeptTokens``: a subset of the image tokens was kept by score (EViT, Top-K, ATS);
* ``SlowFastTokens``: the tokens were ranked by global class attention and the top ones took the slow
  path, the others waited as placeholders (Evo-ViT, Evo-LeViT);
* ``MergedTokens``: tokens were merged into groups (ToMe);
* ``ClusteredTokens``: the image tokens were replaced by one token per cluster (K-Medoids, DPC-KNN,
  PatchMerger).

Patch indices count the tokens of ``grid`` (row-major, without prefix tokens): the input patch grid
for ViTs, the current stage's grid for pyramids (Evo-LeViT). Tensors are detached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True, eq=False)
class Selection:
    """One reducing block's decision. ``block``: index of the block (Evo-LeViT: of the layer) that
    made it; ``grid``: (rows, cols) of the patch grid its indices refer to."""

    block: int
    grid: Tuple[int, int]


@dataclass(frozen=True, eq=False)
class KeptTokens(Selection):
    """Attentive-token identification (EViT, ICLR 2022, Sec. 3; Top-K pruning): the block kept the
    image tokens with the highest [CLS] attention.

    ``kept`` [B, k]: patch index of each kept token in descending score order (-1: EViT's fused
    token from an earlier block); ``scores`` [B, n]: the head-mean [CLS] attention of every image
    token the block scored; ``source_index`` [B, n]: the patch index of each scored token.

    Methods that keep a different number of tokens per image (ATS) pad ``kept`` to the batch's
    longest row: ``valid`` [B, k] is False at padding (whose ``kept`` and ``source_index`` are -1),
    None when every row is full. ATS keeps in ascending order of its significance scores."""

    kept: torch.Tensor
    scores: torch.Tensor
    source_index: torch.Tensor
    valid: Optional[torch.Tensor] = None


@dataclass(frozen=True, eq=False)
class SlowFastTokens(Selection):
    """Structure-preserving token selection (Evo-ViT, AAAI 2022, Sec. 3.2): the patch tokens sorted
    by global class attention; the first ``kept.shape[1]`` take the slow path.

    ``kept`` [B, k]: patch index of each slow token; ``global_attention`` [B, n]: the global class
    attention in descending order; ``source_index`` [B, n]: the patch index of each entry."""

    kept: torch.Tensor
    global_attention: torch.Tensor
    source_index: torch.Tensor


@dataclass(frozen=True, eq=False)
class MergedTokens(Selection):
    """Bipartite soft matching (ToMe, ICLR 2023, Sec. 3): the block merged tokens into groups.

    ``size`` [B, N, 1]: how many input tokens each token now holds (prefix tokens included);
    ``source`` [B, N, num_prefix + P] or None: which input tokens each token holds (recorded only
    while tracing, it costs B·N² memory); ``num_prefix``: the leading prefix columns of ``source``."""

    size: torch.Tensor
    source: Optional[torch.Tensor]
    num_prefix: int


@dataclass(frozen=True, eq=False)
class PrunedMergedTokens(MergedTokens):
    """Token pruning, then merging (DiffRate, ICCV 2023, Sec. 3.2): as ``MergedTokens``, but the patches of
    pruned tokens are held by no token any more (their ``source`` columns are zero), and ``size`` grows by
    each merged token's similarity to its destination, so it is not a count."""


@dataclass(frozen=True, eq=False)
class ClusteredTokens(Selection):
    """Token clustering (Haurum et al., ICCV-W 2023, Sec. 3: K-Medoids, DPC-KNN, PatchMerger): the block's
    image tokens were replaced by one token per cluster.

    ``token_cluster`` [B, n]: the cluster (output token) of each input image token (PatchMerger: the query
    that weighs it most); ``centers`` [B, K] or None: the input token each cluster is centred on
    (K-Medoids' medoids, DPC-KNN's density peaks; None for PatchMerger); ``assignment`` [B, P]: the output
    token that now holds each patch of ``grid``."""

    token_cluster: torch.Tensor
    centers: Optional[torch.Tensor]
    assignment: torch.Tensor
