"""DeiT's distillation through attention (Touvron et al., ICML 2021, Sec. 5; facebookresearch/deit
losses.py DistillationLoss): a frozen teacher sees the same (mixed) images as the student; the
student's distillation head learns the teacher's hard label (CE with its argmax) or its soft
distribution (KL at temperature τ, × τ², divided by batch × classes as DeiT's code), weighted α
against the usual loss on the class head. At evaluation the two heads are averaged (timm)."""
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


class DeiTDistillationLoss:
    """DeiT's DistillationLoss on a student's training heads: ``α`` × distillation + (1 − α) × the
    usual loss on the class head, averaged over the (class, distillation) head pairs — one for DeiT
    and LeViT, two for Evo-LeViT with its auxiliary [CLS] heads (Evo-ViT levit/losses_levit.py,
    type 'cls')."""

    def __init__(self, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0) -> None:
        if kind not in TYPES:
            raise UserInputError(f"Distillation kind={kind!r} is unknown; expected one of {TYPES}.")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise UserInputError(f"Distillation alpha={alpha}, tau={tau}: expected 0 ≤ alpha ≤ 1 and tau > 0.")
        self.kind, self.alpha, self.tau = kind, float(alpha), float(tau)

    def __call__(self, heads: Heads, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 criterion: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its parts (``train/loss_base``, ``train/loss_distill``) for one batch."""
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
    """Register a teacher and DeiT's distillation loss with an ImageClassifier whose network has a
    distillation head (timm's distilled DeiT; LeViT's ``head_dist``; Evo-LeViT), through
    ``pl_module.set_distillation`` for fitting."""

    def __init__(self, teacher: str = "regnety_160", teacher_path: Optional[str] = None, kind: str = "hard",
                 alpha: float = 0.5, tau: float = 1.0, teacher_module: Optional[nn.Module] = None) -> None:
        self.loss = DeiTDistillationLoss(kind, alpha, tau)
        self.teacher_name, self.teacher_path = teacher, teacher_path
        self.teacher = teacher_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher is None:
            self.teacher = build_teacher(self.teacher_name, pl_module.hparams.num_classes, self.teacher_path)
        pl_module.set_distillation(self.teacher, self.loss)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.set_distillation(None)
