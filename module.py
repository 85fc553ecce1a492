"""The LightningModule: an image classifier trained with the DeiT recipe.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021, Sec. 6 / Table 9: AdamW with no weight decay on norms, biases and embeddings; learning
rate scaled by global batch / 512; per-iteration cosine schedule with linear warm-up; label
smoothing; Mixup + CutMix; stochastic depth; optional EMA of the weights (evaluated too).
The network is a backbone, optionally run through a token reducer (EViT, Evo-ViT, ToMe).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import pytorch_lightning as pl
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils.agc import adaptive_clip_grad
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from accel.backbones.reduced_vit import ReducedViT
from accel.errors import UserInputError
from accel.heads import Distillable, Heads
from accel.param_groups import freeze_backbone, freeze_parameters, split_backbone_and_reducer, zero_backbone_lr
from accel.reducers.base import TokenReducer
from accel.reducers.protocol import TokenReducingNet
from accel.reducers.selection import Selection

class DistillationLoss(Protocol):
    """``loss(heads, teacher, targets, criterion)`` → (total loss, named parts to log), with the
    student's training ``heads`` and the teacher's output read as ``Heads`` (``teacher.main``: its
    logits; ``teacher.tokens``: its final image tokens, for a teacher that returns them).
    ``uses_dist_head``: the student must return its distillation head apart (DeiT's loss; a loss
    without the attribute is taken to need it); false for losses on the class head alone."""

    def __call__(self, heads: Heads, teacher: Heads, targets: torch.Tensor,
                 criterion: nn.Module) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]: ...


def _uses_dist_head(loss: DistillationLoss) -> bool:
    return getattr(loss, "uses_dist_head", True)


class Teacher(NamedTuple):
    """A registered teacher and its loss. Not an ``nn.Module``: the teacher is never trained, saved
    in the checkpoint or synchronised by DDP (each process keeps its own frozen copy), and follows
    the student's device at each step."""

    model: nn.Module
    loss: DistillationLoss


class ImageClassifier(pl.LightningModule):
    """Backbone (+ optional token reducer) trained as a classifier with the DeiT recipe.

    ``optimizer`` and ``scheduler`` are partials from Hydra (``_partial_: true``): the optimizer is
    called with ``(net, lr=scaled_lr)``; the scheduler with ``(optimizer, t_initial=total_steps,
    warmup_t=warmup_steps)`` and is stepped every iteration.

    The module owns the network and its EMA copy. Callbacks talk to it through named methods only:
    ``set_keep_rate`` / ``keep_rate`` and ``set_layerwise`` / ``layerwise`` act on both networks, so
    the EMA is evaluated at the live network's keep rate and selection mode; ``selections`` and
    ``set_tracing`` serve pictures; ``set_distillation`` registers a teacher; ``set_test_prefix``
    names what ``trainer.test`` evaluates.

    Learned reducers' recipes (``accel.param_groups``): ``backbone_lr_scale`` multiplies the lr of
    every parameter outside ``reducer.`` (timm's ``lr_scale`` group key; 0 freezes the backbone),
    ``backbone_freeze_epochs`` holds the backbone at lr 0 for the first epochs, and
    ``frozen_parameters`` names parameters that are never trained (DynamicViT: 0.01, 5,
    ``[cls_token, pos_embed]``).

    Training heads are read as ``accel.heads.Heads`` (``Heads.of`` adapts timm's distilled models);
    the loss is the mean of the criterion over the heads, or the registered distillation loss, plus
    the extra terms a learned reducer computes (``Heads.losses``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        reducer: Optional[TokenReducer] = None,
        num_classes: int = 1000,
        batch_size: int = 128,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[..., Any]] = None,
        lr: float = 5e-4,
        lr_base_batch: int = 512,
        warmup_epochs: float = 5.0,
        smoothing: float = 0.1,
        mixup: Optional[Dict[str, Any]] = None,
        ema_decay: Optional[float] = None,
        agc_clip: Optional[float] = None,
        backbone_lr_scale: float = 1.0,
        backbone_freeze_epochs: int = 0,
        frozen_parameters: Sequence[str] = (),
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "reducer", "optimizer", "scheduler"])
        self.net = ReducedViT(backbone, reducer) if reducer is not None else backbone
        # Learned reducers' recipes (accel.param_groups): frozen names, and a backbone trained slower
        # than the reducer's parameters (scale 0: not at all), before the EMA copies the network.
        freeze_parameters(self.net, frozen_parameters)
        if backbone_lr_scale < 0 or backbone_freeze_epochs < 0:
            raise UserInputError(f"module.backbone_lr_scale={backbone_lr_scale}, module.backbone_freeze_epochs="
                                 f"{backbone_freeze_epochs}: expected values ≥ 0.")
        if backbone_lr_scale == 0:
            freeze_backbone(self.net)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        mixup = dict(mixup or {})
        active = mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0
        self.mixup = Mixup(label_smoothing=smoothing, num_classes=num_classes, **mixup) if active else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(self.net, decay=ema_decay) if ema_decay else None
        if self.ema is not None:
            # An average, never trained: DDP would otherwise wait for gradients of the copy. As a
            # submodule it still moves with the module and is saved and restored as ``ema.*``.
            self.ema.requires_grad_(False)
        if compile:
            # torch.compile in place (nn.Module.compile): the state dict keeps its net.* keys; the EMA
            # copy, made above, stays eager.
            self.net.compile()
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{prefix}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for prefix in ("val", "test", "val_ema", "test_ema") for name, k in (("acc1", 1), ("acc5", top5))
        })
        self._epoch_start = 0.0
        self._epoch_images = 0
        #: The teacher and its loss while distilling (``set_distillation``); None otherwise.
        self.distillation: Optional[Teacher] = None
        self._test_prefix = "eval/val"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # --- token reduction: the surface callbacks use --------------------------------------------
    def _networks(self) -> List[nn.Module]:
        """The live network and, when there is one, its EMA copy."""
        return [self.net] if self.ema is None else [self.net, self.ema.module]

    @property
    def num_parameters(self) -> int:
        """Parameters of the network (its EMA copy, a shadow of the same weights, is not counted)."""
        return sum(p.numel() for p in self.net.parameters())

    @property
    def reduces_tokens(self) -> bool:
        """Whether the network is a token-reducing one (``accel.reducers.protocol.TokenReducingNet``)."""
        return isinstance(self.net, TokenReducingNet)

    @property
    def keep_rate(self) -> Optional[float]:
        """The network's keep rate (EViT, Evo-ViT, ToMe, Evo-LeViT); None if it reduces no tokens."""
        return self.net.keep_rate if self.reduces_tokens else None

    def set_keep_rate(self, keep_rate: float) -> None:
        """Set the keep rate of the network and of its EMA copy (a reducer that cannot follow
        ``keep_rate``, such as ToMe with an explicit r, refuses in one sentence)."""
        if not self.reduces_tokens:
            raise UserInputError(f"Setting keep_rate={keep_rate} needs a token reducer (reducer=evit|evo|tome, or an "
                                 f"Evo-LeViT model); {type(self.net).__name__} has none.")
        for net in self._networks():
            net.set_keep_rate(keep_rate)

    @property
    def layerwise(self) -> Optional[bool]:
        """Evo-ViT's selection mode in training (Sec. 3.4): True layer-wise, False stage-wise; None
        for a network without one."""
        return self.net.layerwise if self.reduces_tokens else None

    def set_layerwise(self, enable: bool) -> None:
        """Switch Evo-ViT's (or Evo-LeViT's) selection mode of the network and of its EMA copy."""
        if self.layerwise is None:
            raise UserInputError(f"{type(self.net).__name__} has no layer-wise/stage-wise selection mode; expected "
                                 "Evo-ViT (reducer=evo) or an Evo-LeViT model.")
        for net in self._networks():
            net.set_layerwise(enable)

    @property
    def selections(self) -> List[Selection]:
        """What the network's last forward (``self(x)``) kept, fused or merged, one typed record per
        reducing block (``accel.reducers.selection``); empty for a network that reduces no tokens."""
        return self.net.selections if self.reduces_tokens else []

    @property
    def tracing(self) -> bool:
        """Whether ``selections`` record what only pictures need (see ``set_tracing``)."""
        return self.net.tracing if self.reduces_tokens else False

    def set_tracing(self, enable: bool) -> None:
        """Record in ``selections`` also what only pictures need (ToMe's merge sources), for the
        forwards of ``self(x)``; nothing to record for a network that reduces no tokens."""
        if self.reduces_tokens:
            self.net.set_tracing(enable)

    # --- distillation -------------------------------------------------------------------------
    def set_distillation(self, teacher: Optional[nn.Module], loss: Optional[DistillationLoss] = None) -> None:
        """Train against ``teacher`` with ``loss(heads, teacher, targets, criterion)`` (see
        ``DistillationLoss``), the network returning its distillation head apart (``Heads.dist``)
        when the loss uses it; ``None`` stops distilling.

        The teacher is kept frozen and in eval mode, outside the module's parameters and state dict."""
        if teacher is None:
            if self.distillation is not None and _uses_dist_head(self.distillation.loss):
                for net in self._networks():
                    net.set_distilled_training(False)
            self.distillation = None
            return
        if loss is None:
            raise ValueError("set_distillation needs the distillation loss with the teacher.")
        if _uses_dist_head(loss):
            if not isinstance(self.net, Distillable):
                raise UserInputError(f"Distillation needs a student with a distillation head, but "
                                     f"{type(self.net).__name__} has none; use a distilled model (e.g. "
                                     "model=deit_s_distilled).")
            for net in self._networks():
                net.set_distilled_training(True)
        self.distillation = Teacher(teacher.requires_grad_(False).eval(), loss)

    # --- training ---------------------------------------------------------------------------
    def loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        """Criterion on a training forward's heads (``Heads``, or what ``Heads.of`` reads): the mean
        of the per-head losses (Evo-ViT's auxiliary [CLS] head: 0.5/0.5)."""
        heads = Heads.of(outputs).tensors()
        return sum(self.criterion(h, targets) for h in heads) / len(heads)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        heads = Heads.of(self.net(images))
        if self.distillation is not None:
            teacher = self.distillation.model.to(images.device)
            with torch.no_grad():
                teacher_out = Heads.of(teacher(images))
            loss, parts = self.distillation.loss(heads, teacher_out, targets, self.criterion)
            self.log_dict(parts, on_step=True, on_epoch=True, batch_size=images.shape[0])
        else:
            loss = self.loss(heads, targets)
        if heads.losses:
            # A learned reducer's own objective terms (keep-ratio or FLOPs targets), already weighted.
            loss = loss + sum(heads.losses.values())
            self.log_dict({f"train/loss_{name}": term.detach() for name, term in heads.losses.items()},
                          on_step=True, on_epoch=True, batch_size=images.shape[0])
        if self._logs_this_step() and not torch.isfinite(loss):
            raise FloatingPointError(f"Loss is {loss.item()} at step {self.global_step}; lower the learning rate "
                                     "or enable gradient clipping (trainer.gradient_clip_val).")
        self._epoch_images += images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning logs this step (every ``trainer.log_every_n_steps``). Reading the loss
        back to the host stalls the GPU's queue of kernels, so its finiteness is checked only on the
        steps that read it back for logging anyway; a NaN is caught within that many steps."""
        every = self._trainer.log_every_n_steps if self._trainer is not None else 0
        return bool(every) and self.global_step % every == 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update(self.net, step=self.global_step)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # After the scheduler's update of the previous step, before this step's update.
        if self.current_epoch < self.hparams.backbone_freeze_epochs:
            for optimizer in self.trainer.optimizers:
                zero_backbone_lr(optimizer)

    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._epoch_images = time.perf_counter(), 0

    def on_train_epoch_end(self) -> None:
        seconds = max(time.perf_counter() - self._epoch_start, 1e-9)
        # Summed over processes: images per second of the whole job.
        self.log("train/images_per_sec", self._epoch_images / seconds, reduce_fx="sum", sync_dist=True)

    # --- evaluation --------------------------------------------------------------------------
    def set_test_prefix(self, prefix: str) -> None:
        """Name what ``trainer.test`` evaluates: it logs ``<prefix>_loss``, ``<prefix>_acc1``,
        ``<prefix>_ema_acc1``, ... The data modules' test split is their validation split, so the
        prefix says the split and the weights: ``eval/val`` (default: the weights given),
        ``best/val`` (the checkpoint selected on that same split)."""
        self._test_prefix = prefix

    def _evaluate(self, stage: str, batch) -> None:
        images, targets = batch
        logits = self.net(images)
        name = "val/" if stage == "val" else f"{self._test_prefix}_"
        self.log(f"{name}loss", nn.functional.cross_entropy(logits, targets), sync_dist=True,
                 prog_bar=stage == "val", batch_size=images.shape[0])
        nets = [("", logits)]
        if self.ema is not None:
            nets.append(("_ema", self.ema.module(images)))
        for suffix, out in nets:
            for metric_name in ("acc1", "acc5"):
                metric = self.metrics[f"{stage}{suffix}_{metric_name}"]
                metric(out, targets)
                self.log(f"{name}{suffix.lstrip('_') + '_' if suffix else ''}{metric_name}", metric,
                         prog_bar=metric_name == "acc1", batch_size=images.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    # --- optimisation ------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of this process: ceil(batches / accumulate_grad_batches), as
        Lightning steps on the last, partial accumulation of an epoch too. Schedules given in epochs
        (warm-up, keep rate) count epochs in these steps, whatever ends the run."""
        trainer = self.trainer
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise UserInputError("Schedules in epochs (module.warmup_epochs, the keep-rate schedule) need the number "
                                 "of training batches per epoch, but the training data loader has no length; "
                                 "expected a data set with a length.")
        return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)

    def scaled_lr(self) -> float:
        """DeiT's linear scaling rule: lr × global batch / ``lr_base_batch``."""
        hp = self.hparams
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return hp.lr * hp.batch_size * world * accumulate / hp.lr_base_batch

    def configure_optimizers(self):
        lr = self.scaled_lr()
        if self.optimizer_factory is None:
            from timm.optim import create_optimizer_v2
            optimizer = create_optimizer_v2(self.net, opt="adamw", lr=lr, weight_decay=0.05)
        else:
            optimizer = self.optimizer_factory(self.net, lr=lr)
        hp = self.hparams
        if hp.backbone_lr_scale not in (0, 1) or hp.backbone_freeze_epochs:
            split_backbone_and_reducer(optimizer, self.net, hp.backbone_lr_scale,
                                       apply_scale=self.scheduler_factory is None)
        if self.scheduler_factory is None:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(round(self.hparams.warmup_epochs * self.steps_per_epoch)) if self.hparams.warmup_epochs else 0
        scheduler = self.scheduler_factory(optimizer, t_initial=total, warmup_t=min(warmup, total - 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # LeViT's recipe clips by adaptive gradient clipping (unit-wise, relative to the weight norm),
        # which Lightning's norm/value clipping cannot express.
        if self.hparams.agc_clip:
            adaptive_clip_grad(self.net.parameters(), clip_factor=self.hparams.agc_clip)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # timm schedulers are stepped with the number of updates done so far.
        scheduler.step_update(num_updates=self.global_step)
