"""The logits of a classifier's heads in training, by role instead of by position in a tuple.

Training objectives of the implemented papers read several heads of one forward:

* DeiT (Touvron et al., ICML 2021, Sec. 5) and LeViT (Graham et al., ICCV 2021, Sec. 4.3): a class
  head and a distillation head, trained on the labels and on the teacher; at evaluation the two
  are averaged;
* Evo-ViT (Xu et al., AAAI 2022; YifanXu74/Evo-ViT): an auxiliary [CLS] head beside the mean-pooled
  class head, for training only; Evo-LeViT has one per pair (class, distillation).

Token-reducing networks (``accel.reducers.protocol.TokenReducingNet``) return ``Heads`` from a
training-mode forward and plain logits in eval mode. ``Heads.of`` takes any classifier's
training-mode output (a tensor; timm's distilled models' ``(x, x_dist)``; ``Heads``) to ``Heads``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch


def _mean(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return a if a is None or b is None else (a + b) / 2


@dataclass(frozen=True, eq=False)
class Heads:
    """Logits [B, classes] of each training head.

    ``main``: the class head (DeiT's [CLS] head; Evo-ViT's and Evo-LeViT's mean-pooled head).
    ``dist``: the distillation head (distilled DeiT's distillation token, LeViT's ``head_dist``).
    ``aux_cls``: Evo-ViT's auxiliary [CLS] head, used only in training.
    ``aux_dist``: Evo-LeViT's auxiliary [CLS] distillation head, the partner of ``aux_cls``.
    ``losses``: extra terms of the training objective that the network itself computes (a learned
    reducer's ratio or FLOPs target, ``TokenReducer.training_losses``), already weighted and named
    for logging; the module adds them to the loss of the heads.
    ``tokens``: the final image tokens after the last norm [B, n, C], for losses that distil tokens
    (DynamicViT, Rao et al., NeurIPS 2021, Sec. 3.4: the student's and the teacher's); None when the
    network does not return them.
    ``token_keep``: [B, n], 1 for each of ``tokens`` still kept at the end and 0 for one dropped
    (DynamicViT's final decision in training, where dropped tokens stay in place but masked); None:
    every token counts.
    """

    main: torch.Tensor
    dist: Optional[torch.Tensor] = None
    aux_cls: Optional[torch.Tensor] = None
    aux_dist: Optional[torch.Tensor] = None
    losses: Mapping[str, torch.Tensor] = field(default_factory=dict)
    tokens: Optional[torch.Tensor] = None
    token_keep: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # Distillation pairs each class head with a distillation head: both auxiliary heads or neither
        # once there is a distillation head, and never an auxiliary distillation head alone.
        if self.aux_dist is not None and (self.aux_cls is None or self.dist is None):
            raise ValueError("Heads.aux_dist needs aux_cls and dist (it is their distillation partner).")
        if self.dist is not None and self.aux_cls is not None and self.aux_dist is None:
            raise ValueError("Heads with dist and aux_cls need aux_dist, the auxiliary head's distillation partner.")

    @classmethod
    def of(cls, output) -> "Heads":
        """A classifier's training-mode output as ``Heads``: logits → ``main``; timm's distilled
        DeiT/LeViT in distilled training return ``(class, distillation)`` logits → ``main``, ``dist``."""
        if isinstance(output, Heads):
            return output
        if isinstance(output, torch.Tensor):
            return cls(output)
        if isinstance(output, tuple) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output):
            return cls(output[0], dist=output[1])
        raise TypeError(f"Cannot read training heads from a {type(output).__name__}; expected logits, Heads or "
                        "timm's (class, distillation) pair.")

    def tensors(self) -> List[torch.Tensor]:
        """Every head present, in the order main, dist, aux_cls, aux_dist."""
        return [t for t in (self.main, self.dist, self.aux_cls, self.aux_dist) if t is not None]

    def pairs(self) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(class head, its distillation head or None) for the main head and the auxiliary one."""
        pairs = [(self.main, self.dist)]
        if self.aux_cls is not None:
            pairs.append((self.aux_cls, self.aux_dist))
        return pairs

    def averaged(self) -> "Heads":
        """Each class head averaged with its distillation head: what a distilled network trains on
        without a teacher (timm's distilled models outside distilled training, Evo-LeViT)."""
        return Heads(_mean(self.main, self.dist), aux_cls=_mean(self.aux_cls, self.aux_dist), losses=self.losses,
                     tokens=self.tokens, token_keep=self.token_keep)

    def with_losses(self, losses: Mapping[str, torch.Tensor]) -> "Heads":
        """These heads with ``losses`` added to the extra loss terms (a name may appear only once)."""
        clash = set(losses) & set(self.losses)
        if clash:
            raise ValueError(f"Extra loss terms named twice: {sorted(clash)}.")
        return replace(self, losses={**self.losses, **losses})

    def with_tokens(self, tokens: torch.Tensor, token_keep: Optional[torch.Tensor] = None) -> "Heads":
        """These heads with the final image tokens (and which of them are kept) for token distillation."""
        return replace(self, tokens=tokens, token_keep=token_keep)

    def eval_logits(self) -> torch.Tensor:
        """The logits at evaluation: the class head, averaged with the distillation head where there
        is one (DeiT, LeViT); the auxiliary [CLS] heads are for training only (Evo-ViT)."""
        return self.averaged().main


@runtime_checkable
class Distillable(Protocol):
    """A network with a distillation head whose logits a training-mode forward returns apart from
    the class head's once ``set_distilled_training(True)`` (timm's distilled DeiT and LeViT, and
    ``ReducedViT`` and ``EvoLevit`` built with one; those built without refuse with
    ``UserInputError``)."""

    def set_distilled_training(self, enable: bool = True) -> None: ...
