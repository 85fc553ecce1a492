"""Evo-ViT's slow-fast token evolution as small pure functions, shared by the DeiT reducer
(``accel.reducers.evo.EvoViT``) and Evo-LeViT (``accel.backbones.evo_levit.EvoLevit``).

Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer", AAAI 2022:

* Sec. 3.2, global class attention ``A``: each layer's [CLS] attention row ``s`` over the patch
  tokens updates ``A ← (1−t)·A + t·s`` (``update_global_attention``); the first layer sets ``A = s``.
* Sec. 3.2, structure-preserving selection: the patch tokens are sorted by ``A`` and the top ones
  take the slow path (``split``); the others are parked as placeholders.
* Sec. 3.3, slow-fast updating: the placeholders' ``A``-weighted mean (``representative_token``)
  runs through the layers beside the slow tokens, and its residual update is added to every
  placeholder when they rejoin (``join``).
* Sec. 3.4, layer-to-stage training: selection at every layer early in training, once per stage
  later and at inference (``LayerToStage``).

The tensors: ``x`` [B, 1 + n, C] ([CLS] first), ``A`` and ``index`` [B, n] (the score and the patch
index of each patch token, in the order of ``x``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` [B, N, C] reordered/subset along the tokens by ``idx`` [B, K]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def update_global_attention(A: Optional[torch.Tensor], s: torch.Tensor, t, count: Optional[int] = None) -> torch.Tensor:
    """``(1−t)·A + t·s`` for the first ``count`` tokens (all when None), the rest of ``A`` unchanged;
    ``s`` itself when there is no ``A`` yet (the first layer). ``s`` has at least ``count`` entries."""
    if A is None:
        return s
    count = A.shape[1] if count is None else count
    return torch.cat([(1 - t) * A[:, :count] + t * s[:, :count], A[:, count:]], dim=1)


def representative_token(placeholders: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The placeholders' mean weighted by ``weights / Σ weights`` (their global attention), [B, 1, C]."""
    w = weights / weights.sum(dim=1, keepdim=True)
    return (w.unsqueeze(-1) * placeholders).sum(dim=1, keepdim=True)


class Parked(NamedTuple):
    """The fast-path tokens while the slow ones run: the placeholders, and the representative token
    as it entered the layers (appended last to the slow tokens), or None without a fast path."""
    tokens: torch.Tensor
    representative: Optional[torch.Tensor]


def split(x: torch.Tensor, A: torch.Tensor, index: torch.Tensor, n_keep: int,
          representative: bool) -> Tuple[torch.Tensor, Parked, torch.Tensor, torch.Tensor]:
    """Sort the patch tokens by ``A``; return ``[CLS] + the top n_keep`` (+ the representative
    token of the others when ``representative`` and some are parked), the parked tokens, and ``A``
    and ``index`` in the new order."""
    order = torch.argsort(A, dim=1, descending=True)
    A, index = A.gather(1, order), index.gather(1, order)
    patches = gather_tokens(x[:, 1:], order)
    rest = patches[:, n_keep:]
    parts = [x[:, :1], patches[:, :n_keep]]
    rep = None
    if representative and rest.shape[1] > 0:
        rep = representative_token(rest, A[:, n_keep:])
        parts.append(rep)
    return torch.cat(parts, dim=1), Parked(rest, rep), A, index


def join(x: torch.Tensor, parked: Parked, update: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The slow tokens and the placeholders back in one sequence; with a representative token,
    every placeholder first receives what the layers added to it: ``update`` [B, 1, C] (the sum of
    its residual branches, as Evo-LeViT's code adds them up) or, when None, its output minus its
    input."""
    if parked.representative is None:
        return torch.cat([x, parked.tokens], dim=1)
    if update is None:
        update = x[:, -1:] - parked.representative
    return torch.cat([x[:, :-1], parked.tokens + update], dim=1)


class LayerToStage:
    """The selection mode of Evo-ViT's layer-to-stage training (Sec. 3.4), mixed into an
    ``nn.Module``: while training with ``layerwise`` the tokens are re-selected at every pruned
    layer; otherwise (later epochs, inference) once per stage."""

    layerwise: bool

    def set_layerwise(self, enable: bool) -> None:
        """Layer-wise selection while training (True) or stage-wise (False: inference behaviour)."""
        self.layerwise = bool(enable)

    def selects_every_layer(self) -> bool:
        return self.training and self.layerwise
