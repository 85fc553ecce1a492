"""The surface every token-reducing network offers, whatever reduces its tokens: the timm ViT
wrapper (``accel.backbones.ReducedViT`` with EViT, Evo-ViT, ToMe or Top-K) and pyramid models that
reduce tokens themselves (``accel.backbones.evo_levit.EvoLevit``).

Callers (training loops, schedules, pictures) use only this surface: they test ``layerwise is
None`` for "no selection mode" instead of probing attributes, and dispatch on the type of each
entry of ``selections`` (``accel.reducers.selection``).
"""
from __future__ import annotations

from typing import List, Optional, Protocol, runtime_checkable

import torch

from accel.reducers.selection import Selection


@runtime_checkable
class TokenReducingNet(Protocol):
    """A network whose token reduction is steered at run time and reports what it decided.

    - ``keep_rate`` / ``set_keep_rate(r)``: the fraction of tokens kept (schedules change it
      between batches); a value the method cannot follow raises ``UserInputError``.
    - ``layerwise`` / ``set_layerwise(flag)``: Evo-ViT's selection mode while training (Sec. 3.4:
      True re-selects at every layer, False once per stage as at inference). ``layerwise is None``
      means the network has no such mode, and ``set_layerwise`` then raises ``UserInputError``.
    - ``selections``: the last forward's decisions, one typed record per reducing block, in order.
    - ``tracing`` / ``set_tracing(flag)``: also record the costlier parts of the selections that
      pictures need (ToMe's merge sources); networks whose selections are always complete ignore it.
    - ``forward_features(x)`` → tokens (a tensor, as timm's) and ``forward_head(x)`` → logits, with
      ``forward(x) == forward_head(forward_features(x))``; in training mode the head returns
      ``accel.heads.Heads`` (class head, and distillation and auxiliary heads where there are any).
    """

    @property
    def keep_rate(self) -> float: ...

    def set_keep_rate(self, keep_rate: float) -> None: ...

    @property
    def layerwise(self) -> Optional[bool]: ...

    def set_layerwise(self, enable: bool) -> None: ...

    @property
    def selections(self) -> List[Selection]: ...

    @property
    def tracing(self) -> bool: ...

    def set_tracing(self, enable: bool) -> None: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False): ...


class RecordsSelections:
    """``selections`` for a network that keeps the last forward's records in ``self._selections``."""

    _selections: List[Selection]

    @property
    def selections(self) -> List[Selection]:
        """The last forward's selections, one per reducing block, in order."""
        return list(self._selections)
