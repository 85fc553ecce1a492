"""The token-reducer interface: a strategy that decides which tokens go through each ViT block.

A wrapper (``accel.backbones.ReducedViT``) runs a timm VisionTransformer's embedding, blocks and
head; before each block it hands the block to the reducer. Subclasses implement EViT, Evo-ViT, ToMe
and Top-K; this base class is the identity strategy (every token through every block).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from accel.errors import UserInputError
from accel.reducers.selection import Selection

State = Dict[str, Any]


def check_keep_rate(keep_rate: float) -> float:
    """``keep_rate`` as a float, or a UserInputError if it is outside (0, 1]."""
    try:
        value = float(keep_rate)
    except (TypeError, ValueError):
        raise UserInputError(f"keep_rate={keep_rate!r} is not a number; expected a value in (0, 1].") from None
    if not 0.0 < value <= 1.0:
        raise UserInputError(f"keep_rate={keep_rate!r} is outside (0, 1]; expected e.g. 0.7 to keep 70% of the tokens.")
    return value


class TokenReducer(nn.Module):
    """Identity token reducer: every token goes through every block, logits equal timm's.

    Interface used by the wrapper:
      - ``bind(vit)``: called once when wrapped; checks that the backbone suits the method.
      - ``reset(x, num_prefix)`` → state, once per forward after patch + position embedding.
      - ``block(i, blk, x, state)`` → (x, state): run timm block ``i`` on the tokens it chooses.
        A block may rebind keys of ``state`` but never change a tensor in it in place: with
        gradient checkpointing the wrapper re-runs a block on the state it started from.
        Decisions are recorded with ``record(state, selection)``, never on ``self``.
      - ``features(vit, x, state)``: the tokens ``forward_features`` returns (timm: final norm).
      - ``head(vit, x, state, pre_logits)``: pooling and classifier (timm's by default).
      - ``training_losses(state)``: extra, weighted, named loss terms of a training forward (learned
        reducers: DynamicViT's keep-ratio target, DiffRate's FLOPs target); the module sums them.
      - ``set_keep_rate(r)`` / ``keep_rate``: settable while training (schedules).
      - ``layerwise`` / ``set_layerwise``: Evo-ViT's selection mode; None for reducers without one.
      - ``tracing`` / ``set_tracing``: record the costlier selections the pictures need.
    """

    #: Evo-ViT's selection mode (Sec. 3.4); None: this reducer has none (see ``set_layerwise``).
    layerwise: Optional[bool] = None
    #: The method's name as papers write it, for plots and tables ("Evo-ViT"); None: the class name.
    label: Optional[str] = None
    #: The constructor argument that, when set, names the point on the method's speed/accuracy curve in
    #: place of the keep rate (ToMe's ``r``, DiffRate's ``schedule``); None: the keep rate always does.
    knob: Optional[str] = None

    def __init__(self, keep_rate: float = 1.0, explicit_attention: bool = False) -> None:
        super().__init__()
        self._keep_rate = check_keep_rate(keep_rate)
        # Reference-style attention (full N×N matrix in Python) instead of SDPA + a 1×N [CLS] row:
        # same values, kept so that the benchmark can show what the fused path saves.
        self.explicit_attention = explicit_attention
        self.grid: Tuple[int, int] = (0, 0)

    @property
    def keep_rate(self) -> float:
        return self._keep_rate

    def set_keep_rate(self, keep_rate: float) -> None:
        self._keep_rate = check_keep_rate(keep_rate)

    def set_layerwise(self, enable: bool) -> None:
        raise UserInputError(f"{type(self).__name__} has no layer-wise/stage-wise selection mode; "
                             "expected Evo-ViT (reducer=evo).")

    @property
    def tracing(self) -> bool:
        """Whether the selections hold everything the pictures draw (always, unless overridden)."""
        return True

    def set_tracing(self, enable: bool) -> None:
        """Record the costlier parts of the selections (ToMe's merge sources); a no-op here."""

    def bind(self, vit: nn.Module) -> None:
        """Validate the backbone once, when the reducer is attached to it (subclasses call this)."""
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)

    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        return {"num_prefix": num_prefix, "selections": ()}

    @staticmethod
    def record(state: State, selection: Selection) -> None:
        """Append a block's decision to this forward's selections (a new tuple, so that a re-run
        block under gradient checkpointing records into its own copy of the state)."""
        state["selections"] = state["selections"] + (selection,)

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        return self.full_block(blk, x), state

    def full_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A block with no reduction: timm's own forward, or the reference style on request."""
        if not self.explicit_attention:
            return blk(x)
        from accel.reducers.attention import attention, attn_residual, mlp_residual
        return mlp_residual(blk, attn_residual(blk, x, attention(blk.attn, blk.norm1(x), explicit=True)))

    def features(self, vit: nn.Module, x: torch.Tensor, state: State) -> torch.Tensor:
        """The tokens after the last block as timm's ``forward_features`` returns them (final norm)."""
        return vit.norm(x)

    def head(self, vit: nn.Module, x: torch.Tensor, state: Optional[State], pre_logits: bool = False):
        """Logits from ``features``' tokens (timm's pooling, head norm and classifier)."""
        return vit.forward_head(x, pre_logits=pre_logits)

    def training_losses(self, state: State) -> Dict[str, torch.Tensor]:
        """Extra terms of the training objective from this forward's ``state``, already weighted,
        by name (logged as ``train/loss_<name>``); none for a reducer without learned parts."""
        return {}

    def extra_repr(self) -> str:
        return f"keep_rate={self._keep_rate}"


class TracesSources:
    """``tracing`` / ``set_tracing`` for a merging reducer whose ``trace_source`` flag records, per
    token, which input tokens it holds (``MergedTokens.source``: B·N² memory, for pictures only)."""

    trace_source: bool

    @property
    def tracing(self) -> bool:
        return self.trace_source

    def set_tracing(self, enable: bool) -> None:
        """Record which input tokens each merged token holds (``MergedTokens.source``)."""
        self.trace_source = bool(enable)
