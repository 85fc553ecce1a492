"""DynamicViT (accel/reducers/dynamicvit.py, callbacks/distillation.py DynamicViTDistillationLoss) equals the
authors' code (raoyongming/DynamicViT 1322e62) on a small random DeiT-shaped model: eval logits and the tokens
kept at each stage; in training, with the same Gumbel noise (same seed), each stage's hard decision, the logits,
the final tokens, each loss term against a teacher of the same weights, and the gradients. Fixtures:
tests/fixtures/reference/make_dynamicvit.py (see PROVENANCE.md). Also one short fit through the module with the
distillation callback and the recipe's parameter groups."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from accel.backbones import with_reducer
from accel.reducers.dynamicvit import DynamicViT, from_authors_state_dict
from accel.reducers.selection import KeptTokens
from callbacks.distillation import Distillation, DynamicViTDistillationLoss, TokenTeacher
from module import ImageClassifier

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
MODEL = torch.load(FIXTURES / "dynamicvit_model.pt")
OUT = torch.load(FIXTURES / "dynamicvit_outputs.pt")
IMAGES = (OUT["pixels"].float() - 128) / 64
TOL = dict(atol=1e-4, rtol=1e-4)


def net(keep_rate: float):
    model = with_reducer(VisionTransformer(**MODEL["config"]), DynamicViT(keep_rate, locations=MODEL["locations"]))
    model.load_state_dict(from_authors_state_dict(MODEL["state_dict"]), strict=True)
    return model


@pytest.mark.parametrize("keep_rate", sorted(OUT["eval"]))
def test_eval_logits_and_kept_tokens_equal_the_authors(keep_rate):
    case = OUT["eval"][keep_rate]
    model = net(keep_rate).eval()
    with torch.no_grad():
        logits = model(IMAGES)
    torch.testing.assert_close(logits, case["logits"], **TOL)
    assert [s.block for s in model.selections] == MODEL["locations"]
    assert all(isinstance(s, KeptTokens) for s in model.selections)
    for selection, kept in zip(model.selections, case["kept"]):
        assert torch.equal(selection.kept, kept)   # same tokens, same (descending-score) order


def training_forward():
    t = OUT["train"]
    model = net(t["keep_rate"]).train()
    stages = {}
    reducer = model.reducer
    reducer.training_losses = lambda state: (stages.update(hard=state["hard"]),
                                             DynamicViT.training_losses(reducer, state))[1]
    torch.manual_seed(t["seed"])     # the authors' noise came from the global RNG after this seed
    return model, model(IMAGES), stages["hard"]


def test_training_decisions_logits_tokens_losses_and_gradients_equal_the_authors():
    t = OUT["train"]
    model, heads, hard = training_forward()
    assert len(hard) == len(t["hard"])
    for mine, theirs in zip(hard, t["hard"]):
        assert torch.equal(mine, theirs)
    assert torch.equal(heads.token_keep, t["decision"])
    torch.testing.assert_close(heads.main, t["logits"], **TOL)
    torch.testing.assert_close(heads.tokens, t["tokens"], **TOL)

    teacher_vit = VisionTransformer(**MODEL["config"]).eval()
    teacher_vit.load_state_dict({k: v for k, v in MODEL["state_dict"].items() if not k.startswith("score_predictor.")})
    with torch.no_grad():
        teacher = TokenTeacher(teacher_vit)(IMAGES)
    total, parts = DynamicViTDistillationLoss(t["distill_weight"])(heads, teacher, t["targets"], SoftTargetCrossEntropy())
    torch.testing.assert_close(parts["train/loss_base"], t["cls"], **TOL)
    torch.testing.assert_close(parts["train/loss_distill"], t["cls_kl"], **TOL)
    torch.testing.assert_close(parts["train/loss_token_distill"], t["token_mse"].reshape(()), **TOL)
    torch.testing.assert_close(heads.losses["ratio"], t["ratio_weight"] * t["ratio"] / len(MODEL["locations"]), **TOL)
    loss = total + sum(heads.losses.values())
    torch.testing.assert_close(loss, t["loss"], **TOL)

    loss.backward()
    params = dict(model.named_parameters())
    for name, grad in t["grads"].items():
        mine = params[f"reducer.{name}" if name.startswith("score_predictor.") else f"vit.{name}"].grad
        torch.testing.assert_close(mine, grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_keep_rate_one_at_eval_is_the_plain_vit():
    model = net(1.0).eval()
    with torch.no_grad():
        assert torch.equal(model(IMAGES), model.vit(IMAGES))
    assert model.selections == []


def test_a_short_fit_with_the_teacher_trains_the_predictors_and_logs_each_term(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=4)
    teacher = copy.deepcopy(vit)
    module = ImageClassifier(with_reducer(vit, DynamicViT(0.7, locations=(1, 2))), num_classes=4, batch_size=4,
                             lr=1e-2, smoothing=0.0, warmup_epochs=0, backbone_lr_scale=0.01,
                             frozen_parameters=["cls_token", "pos_embed"])
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 4)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
                         callbacks=[Distillation(teacher_module=teacher, loss=DynamicViTDistillationLoss())])
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    logged = trainer.logged_metrics
    for name in ("train/loss_ratio_step", "train/loss_distill_step", "train/loss_token_distill_step", "train/loss_step"):
        assert torch.isfinite(logged[name]), name
    assert logged["train/loss_token_distill_step"] > 0
    after = module.net.state_dict()
    assert not torch.equal(after["reducer.score_predictor.0.out_conv.4.weight"],
                           before["reducer.score_predictor.0.out_conv.4.weight"])
    assert torch.equal(after["cls_token"], before["cls_token"]) and torch.equal(after["pos_embed"], before["pos_embed"])
    assert all(k.startswith("net.") for k in module.state_dict()), "the teacher stays out of the checkpoint"
    assert [s.kept.shape[1] for s in module.selections] == [11, 7]   # int(16·0.7), int(16·0.49) at validation


def test_configs_compose_to_the_recipes(tmp_path):
    from conftest import make_cfg
    from pipeline import instantiate
    cfg = make_cfg(tmp_path, ["experiment=dynamicvit_deit_s_in1k", "data.root=/imagenet", "model.pretrained_path=/w.pth"])
    assert cfg.model.name == "deit_small_patch16_224" and cfg.reducer._target_.endswith(".DynamicViT")
    assert cfg.keep_rate == 0.7 and list(cfg.reducer.locations) == [3, 6, 9] and cfg.reducer.ratio_weight == 2.0
    m = cfg.module
    assert (m.lr, m.lr_base_batch, m.backbone_lr_scale, m.backbone_freeze_epochs) == (1e-3, 1024, 0.01, 5)
    assert list(m.frozen_parameters) == ["cls_token", "pos_embed"] and cfg.trainer.max_epochs == 30
    assert cfg.callbacks.distillation.teacher_module == cfg.model    # the pretrained DeiT-S the student starts from
    assert isinstance(instantiate(cfg.callbacks.distillation.loss), DynamicViTDistillationLoss)
    cfg = make_cfg(tmp_path, ["experiment=dynamicvit_digits", "++model.depth=6", "++model.embed_dim=32",
                              "++model.num_heads=2", "model.pretrained_path=null"])
    assert cfg.module.backbone_lr_scale == 0.01 and cfg.callbacks.distillation.teacher_module == cfg.model
    module = instantiate(cfg.module)
    assert isinstance(module.net.reducer, DynamicViT) and module.net.reducer.locations == (1, 3, 5)
    with torch.no_grad():
        module.net.eval()(torch.randn(1, 3, cfg.data.image_size, cfg.data.image_size))
    assert [s.kept.shape[1] for s in module.selections] == [11, 7, 5]


def test_an_image_with_every_token_dropped_stays_finite(monkeypatch):
    # The authors' predictor divides by the kept count, 0 here: NaN for that image, and for the batch's loss.
    def drop_all_of_image_0(log_probs, hard=False, **kw):
        out = torch.zeros_like(log_probs)
        out[..., 0] = 1.0
        out[0, :, 0], out[0, :, 1] = 0.0, 1.0
        return out + log_probs - log_probs.detach()   # straight-through, as F.gumbel_softmax(hard=True)
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", drop_all_of_image_0)
    model = net(0.7).train()
    heads = model(IMAGES)
    assert heads.token_keep[0].sum() == 0 and heads.token_keep[1].sum() == 196
    loss = heads.main.logsumexp(-1).sum() + sum(heads.losses.values())
    loss.backward()
    assert torch.isfinite(heads.main).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_stage_keeps_at_least_one_token():
    model = net(0.1).eval()      # int(196 · 0.1^s) = 19, 1, 0: the last stage keeps its one token (no selection)
    with torch.no_grad():
        assert torch.isfinite(model(IMAGES)).all()
    assert [s.kept.shape[1] for s in model.selections] == [19, 1]
