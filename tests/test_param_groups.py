"""Learned reducers' optimisation options of the module (accel.param_groups): the backbone at a fraction
of the reducer's lr (timm's ``lr_scale``, followed by the scheduler), at lr 0 for the first epochs,
frozen by name, or frozen whole (scale 0)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accel.backbones import with_reducer
from accel.errors import UserInputError
from accel.reducers.base import TokenReducer
from module import ImageClassifier
from tests.small_nets import images


class Scaled(TokenReducer):
    """A toy learned reducer: one parameter that scales the tokens and so reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def block(self, i, blk, x, state):
        return blk(x * self.scale if i == 0 else x), state


class RecordLr(pl.Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append((trainer.current_epoch, {g["part"]: g["lr"] for g in optimizer.param_groups}))


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def module(**kw) -> ImageClassifier:
    from functools import partial
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    net = with_reducer(tiny_vit(), Scaled())
    return ImageClassifier(net, num_classes=10, batch_size=4, lr=1e-3, lr_base_batch=4, smoothing=0.0,
                           warmup_epochs=0, optimizer=partial(create_optimizer_v2, opt="adamw", weight_decay=0.05),
                           scheduler=partial(CosineLRScheduler, lr_min=0.0, t_in_epochs=False), **kw)


def fit(m: ImageClassifier, tmp_path, epochs: int, *callbacks: pl.Callback) -> None:
    data = TensorDataset(images(batch=8), torch.arange(8) % 10)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks))
    trainer.fit(m, DataLoader(data, batch_size=4))


def test_backbone_scaled_frozen_for_an_epoch_and_named_parameters_never_trained(tmp_path):
    m = module(backbone_lr_scale=0.1, backbone_freeze_epochs=1, frozen_parameters=["cls_token", "pos_embed"])
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    after_first = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                after_first.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})
    m_record = RecordLr()
    fit(m, tmp_path, 2, m_record, Snapshot())

    epoch0 = [lrs for epoch, lrs in m_record.steps if epoch == 0]
    epoch1 = [lrs for epoch, lrs in m_record.steps if epoch == 1]
    assert len(epoch0) == len(epoch1) == 2
    assert all(lrs["backbone"] == 0.0 and lrs["reducer"] > 0 for lrs in epoch0)
    for lrs in epoch1:   # the cosine's value × lr_scale for the backbone, × 1 for the reducer
        assert lrs["reducer"] > 0 and lrs["backbone"] == pytest.approx(0.1 * lrs["reducer"])
    assert not torch.equal(after_first["reducer.scale"], before["reducer.scale"])
    assert torch.equal(after_first["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    final = m.net.state_dict()
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    for name in ("cls_token", "pos_embed"):
        assert torch.equal(final[name], before[name])


def test_backbone_scale_zero_trains_only_the_reducer(tmp_path):
    m = module(backbone_lr_scale=0.0)
    assert [n for n, p in m.net.named_parameters() if p.requires_grad] == ["reducer.scale"]
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    fit(m, tmp_path, 1)
    final = m.net.state_dict()
    assert [k for k in final if not torch.equal(final[k], before[k])] == ["reducer.scale"]


def test_defaults_leave_the_optimizer_groups_as_the_factory_built_them():
    m = module()
    m.scheduler_factory = None
    assert all("part" not in g and "lr_scale" not in g for g in m.configure_optimizers().param_groups)


def test_bad_options_are_refused_in_one_sentence():
    with pytest.raises(UserInputError, match="'cls_tokn' matches no parameter"):
        module(frozen_parameters=["cls_tokn"])
    with pytest.raises(UserInputError, match="no reducer parameters to train"):
        ImageClassifier(tiny_vit(), num_classes=10, backbone_lr_scale=0.0)
    with pytest.raises(UserInputError, match="expected values ≥ 0"):
        module(backbone_lr_scale=-1.0)
