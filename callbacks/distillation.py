"""Distillation from a frozen teacher that sees the same (mixed) images as the student.

* DeiT's distillation through attention (Touvron et al., ICML 2021, Sec. 5; facebookresearch/deit
  losses.py DistillationLoss), the default: the student's distillation head learns the teacher's
  hard label (CE with its argmax) or its soft distribution (KL at temperature τ, × τ², divided by
  batch × classes as DeiT's code), weighted α against the usual loss on the class head. At
  evaluation the two heads are averaged (timm).
* DynamicViT's teacher terms (Rao et al., NeurIPS 2021, Sec. 3.4; ``DynamicViTDistillationLoss``):
  KL of the class logits and MSE of the kept final image tokens, against the pretrained model.

A loss says what it needs: ``uses_dist_head`` (the student returns its distillation head apart) and
``reads_tokens`` (the teacher's final image tokens, ``Heads.tokens``: the callback then runs the
teacher through ``TokenTeacher``). The module calls ``loss(heads, teacher, targets, criterion)`` with
the student's training ``Heads`` and the teacher's output read as ``Heads``."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn

from accel.checkpoint import load_into
from accel.errors import UserInputError
from accel.heads import Heads

TYPES = ("hard", "soft")


def distillation_loss(student_cls: torch.Tensor, student_dist: torch.Tensor, teacher_logits: torch.Tensor,
                      base: torch.Tensor, kind: str, alpha: float, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(total loss, distillation part) as DeiT's DistillationLoss computes them."""
    if kind == "soft":
        distill = F.kl_div(F.log_softmax(student_dist / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                           reduction="sum", log_target=True) * (tau * tau) / student_dist.numel()
    else:
        distill = F.cross_entropy(student_dist, teacher_logits.argmax(dim=1))
    return base * (1 - alpha) + distill * alpha, distill


def build_teacher(name: str, num_classes: int, path: Optional[str]) -> nn.Module:
    """A frozen timm model by name with weights from a local file (timm, DeiT release or a
    checkpoint of this project)."""
    if not timm.is_model(name):
        raise UserInputError(f"Teacher model {name!r} is not a timm model name; expected e.g. 'regnety_160'.")
    if not path:
        raise UserInputError(f"Distillation needs the teacher's weights: set callbacks.distillation.teacher_path to a "
                             f"local checkpoint of {name} (nothing is downloaded).")
    teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
    load_into(teacher, path, droppable=())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class TokenTeacher(nn.Module):
    """A teacher whose forward returns ``Heads`` with its logits and its final image tokens (after the
    last norm, prefix tokens left out): DynamicViT's ``VisionTransformerTeacher`` for any timm ViT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Heads:
        features = self.model.forward_features(x)
        if features.ndim != 3:
            raise UserInputError(f"Token distillation needs a teacher with tokens, but {type(self.model).__name__}'s "
                                 f"features have shape {tuple(features.shape)}; expected a ViT (e.g. the student's "
                                 "own pretrained DeiT).")
        return Heads(self.model.forward_head(features),
                     tokens=features[:, getattr(self.model, "num_prefix_tokens", 0):])


class DynamicViTDistillationLoss:
    """DynamicViT's objective without its ratio term (which the reducer adds, ``train/loss_ratio``):
    the usual loss on the class head + ``distill_weight`` × KL(teacher ‖ student) of the logits
    (batch mean, τ 1) + ``distill_weight`` × MSE between the student's and the teacher's final image
    tokens where the student's final decision keeps them (mean over kept tokens and channels; 0 when
    none is kept). raoyongming/DynamicViT losses.py ``DistillDiffPruningLoss_dynamic`` with
    ``mse_token=True`` (DeiT); the teacher is the pretrained model the student starts from."""

    uses_dist_head = False
    reads_tokens = True

    def __init__(self, distill_weight: float = 0.5) -> None:
        if distill_weight < 0:
            raise UserInputError(f"DynamicViT distill_weight={distill_weight}: expected a weight ≥ 0.")
        self.distill_weight = float(distill_weight)

    def __call__(self, heads: Heads, teacher, targets: torch.Tensor,
                 criterion: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its parts (``train/loss_base``, ``train/loss_distill`` (KL),
        ``train/loss_token_distill``) for one batch."""
        teacher = Heads.of(teacher)
        if heads.tokens is None or teacher.tokens is None:
            raise UserInputError("Token distillation needs the final image tokens of the student and of the teacher; "
                                 "expected a student whose reducer returns them (reducer=dynamicvit).")
        base = criterion(heads.main, targets)
        kl = F.kl_div(F.log_softmax(heads.main.float(), dim=-1), F.log_softmax(teacher.main.float(), dim=-1),
                      reduction="batchmean", log_target=True)
        per_token = (heads.tokens.float() - teacher.tokens.float()).pow(2).mean(dim=-1)       # [B, n]
        if heads.token_keep is None:
            tokens = per_token.mean()
        else:   # a weighted mean, not a boolean selection: no data-dependent shape, no host sync
            keep = (heads.token_keep > 0.5).to(per_token.dtype)
            tokens = (per_token * keep).sum() / keep.sum().clamp_min(1.0)
        total = base + self.distill_weight * (kl + tokens)
        return total, {"train/loss_base": base.detach(), "train/loss_distill": kl.detach(),
                       "train/loss_token_distill": tokens.detach()}


class DeiTDistillationLoss:
    """DeiT's DistillationLoss on a student's training heads: ``α`` × distillation + (1 − α) × the
    usual loss on the class head, averaged over the (class, distillation) head pairs — one for DeiT
    and LeViT, two for Evo-LeViT with its auxiliary [CLS] heads (Evo-ViT levit/losses_levit.py,
    type 'cls')."""

    uses_dist_head = True
    reads_tokens = False

    def __init__(self, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> None:
        if kind not in TYPES:
            raise UserInputError(f"Distillation kind={kind!r} is unknown; expected one of {TYPES}.")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise UserInputError(f"Distillation alpha={alpha}, tau={tau}: expected 0 ≤ alpha ≤ 1 and tau > 0.")
        self.kind, self.alpha, self.tau = kind, float(alpha), float(tau)

    def __call__(self, heads: Heads, teacher, targets: torch.Tensor,
                 criterion: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its parts (``train/loss_base``, ``train/loss_distill``) for one batch;
        ``teacher``: the teacher's logits, or its output as ``Heads``."""
        teacher_logits = Heads.of(teacher).main.float()
        if heads.dist is None:
            raise UserInputError("The student returned no distillation head in training; expected a distilled model "
                                 "in distilled-training mode.")
        parts = []
        for cls_logits, dist_logits in heads.pairs():
            base = criterion(cls_logits, targets)
            parts.append((base, *distillation_loss(cls_logits, dist_logits, teacher_logits, base, self.kind,
                                                   self.alpha, self.tau)))
        base, total, distill = (sum(p[i] for p in parts) / len(parts) for i in range(3))
        return total, {"train/loss_base": base.detach(), "train/loss_distill": distill.detach()}


class Distillation(pl.Callback):
    """Register a teacher and a distillation loss with an ImageClassifier, through
    ``pl_module.set_distillation`` for fitting: DeiT's loss (``kind``, ``alpha``, ``tau``) for a
    network with a distillation head (timm's distilled DeiT; LeViT's ``head_dist``; Evo-LeViT), or
    the ``loss`` given (e.g. ``DynamicViTDistillationLoss``), whose ``reads_tokens`` has the teacher
    run as a ``TokenTeacher``."""

    def __init__(self, teacher: str = "regnety_160", teacher_path: Optional[str] = None, kind: str = "hard",
                 alpha: float = 0.5, tau: float = 1.0, teacher_module: Optional[nn.Module] = None,
                 loss: Optional[object] = None) -> None:
        self.loss = DeiTDistillationLoss(kind, alpha, tau) if loss is None else loss
        self.teacher_name, self.teacher_path = teacher, teacher_path
        self.teacher = teacher_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher is None:
            self.teacher = build_teacher(self.teacher_name, pl_module.hparams.num_classes, self.teacher_path)
        if getattr(self.loss, "reads_tokens", False) and not isinstance(self.teacher, TokenTeacher):
            self.teacher = TokenTeacher(self.teacher)
        pl_module.set_distillation(self.teacher, self.loss)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.set_distillation(None)
