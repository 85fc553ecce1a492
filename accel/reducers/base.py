"""The token-reducer interface: a strategy that decides which tokens go through each ViT block.

A wrapper (``accel.backbones.ReducedViT``) runs a timm VisionTransformer's embedding, blocks and
head; before each block it hands the block to the reducer. Subclasses implement EViT, Evo-ViT and
ToMe; this base class is the identity strategy (every token through every block).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from accel.errors import UserInputError

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

    Interface used by the wrapper and the callbacks:
      - ``bind(vit)``: called once when wrapped; checks that the backbone suits the method.
      - ``reset(x, num_prefix)`` → state, once per forward after patch + position embedding.
      - ``block(i, blk, x, state)`` → (x, state): run timm block ``i`` on the tokens it chooses.
      - ``head(vit, x, state)``: final norm + classifier (timm's by default).
      - ``set_keep_rate(r)`` / ``keep_rate``: settable while training (schedules).
      - ``last_selection``: what each reducing layer kept/fused/merged in the last forward.
    """

    def __init__(self, keep_rate: float = 1.0, explicit_attention: bool = False) -> None:
        super().__init__()
        self._keep_rate = check_keep_rate(keep_rate)
        # Reference-style attention (full N×N matrix in Python) instead of SDPA + a 1×N [CLS] row:
        # same values, kept so that the benchmark can show what the fused path saves.
        self.explicit_attention = explicit_attention
        self.last_selection: List[Dict[str, torch.Tensor]] = []

    @property
    def keep_rate(self) -> float:
        return self._keep_rate

    def set_keep_rate(self, keep_rate: float) -> None:
        self._keep_rate = check_keep_rate(keep_rate)

    def bind(self, vit: nn.Module) -> None:
        """Validate the backbone once, when the reducer is attached to it."""

    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        self.last_selection = []
        return {"num_prefix": num_prefix}

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        return self.full_block(blk, x), state

    def full_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A block with no reduction: timm's own forward, or the reference style on request."""
        if not self.explicit_attention:
            return blk(x)
        from accel.reducers.attention import attention, attn_residual, mlp_residual
        return mlp_residual(blk, attn_residual(blk, x, attention(blk.attn, blk.norm1(x), explicit=True)))

    def head(self, vit: nn.Module, x: torch.Tensor, state: State) -> torch.Tensor:
        """Logits from the tokens after the last block (timm's final norm, pooling and head)."""
        return vit.forward_head(vit.norm(x))

    def extra_repr(self) -> str:
        return f"keep_rate={self._keep_rate}"
