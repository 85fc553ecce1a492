"""Evo-LeViT: every config, reference names, fusion, bad input, the distillation loss, a short fit.
Equality with the authors' code: tests/test_reference_parity_evo.py."""
import tempfile

import pytest
import timm
import torch
from pytorch_lightning import Callback
from torch import nn

from accel.backbones import create_evo_levit, fuse_levit
from accel.backbones.evo_levit_names import ours_to_reference, reference_to_ours
from accel.errors import UserInputError
from accel.heads import Heads
from callbacks.distillation import DeiTDistillationLoss
from conftest import QUIET, make_cfg
from pipeline import build
from test_levit import randomise_bn

NAMES = ["evo_levit_128s", "evo_levit_128", "evo_levit_192", "evo_levit_256", "evo_levit_384"]


def config(name):
    """conf/model/<name>.yaml as Hydra composes it (the sizes build on model/evo_levit.yaml)."""
    return make_cfg(tempfile.gettempdir(), [f"model={name}"]).model


def make(name, img_size=224, num_classes=10, **kw):
    cfg = config(name)
    return create_evo_levit(name, list(cfg.prune_ratios), list(cfg.stage_prune_ratios), num_classes=num_classes,
                            img_size=img_size, **kw)


def randomise(model):
    """Random BatchNorm statistics/affines (the proj BNs start at γ = 0), trade-offs, embeddings."""
    randomise_bn(model)
    for n, p in model.named_parameters():
        if n.endswith("learn_tradeoff"):
            p.data.normal_(0, 1)
        if n.endswith(("cls_token", "pos_embed")):
            p.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_every_config_runs_forward_and_backward(name):
    model = make(name, 32, num_classes=7, drop_path_rate=float(config(name).drop_path_rate)).train()
    heads = model(torch.randn(2, 3, 32, 32))  # class and distillation heads averaged, aux [CLS] head apart
    cls, aux = heads.main, heads.aux_cls
    assert heads.dist is None and heads.aux_dist is None
    (cls.sum() + aux.sum()).backward()
    assert cls.shape == aux.shape == (2, 7)
    assert model.stem.conv1.linear.weight.grad is not None and model.head_cls.linear.weight.grad is not None
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_reference_names_round_trip_and_load(tmp_path):
    model = randomise(make("evo_levit_128", 64)).eval()
    ref = ours_to_reference(model.state_dict(), model.depth, model.pruned_layers)
    # Both registrations of a tensor: 'blocks' (layer-wise) and 'stage_blocks' (stage-wise).
    for key in ["patch_embed.6.c.weight", "poss", "blocks.0.m1.m.qkv.c.weight", "stage_blocks.0.m.qkv.c.weight",
                "blocks.2.m2.m.2.bn.weight", "stage_blocks.4.m.3.m.2.bn.weight", "blocks.4.kv.c.weight",
                "stage_blocks.5.poss", "blocks.5.m.0.c.weight", "stage_blocks.6.m.0.c.weight",
                "blocks.6.m1.m.learn_tradeoff",
                "stage_blocks.7.m.0.m.qkv.c.weight", "head_cls_dist.l.weight"]:
        assert key in ref, key
    back = reference_to_ours(ref, model.depth, model.pruned_layers)
    sd = model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    torch.save({"model": ref}, tmp_path / "evo_levit_128.pth")
    loaded = make("evo_levit_128", 64, pretrained_path=str(tmp_path / "evo_levit_128.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        loaded.remove_cls()  # deployment: the training-only [CLS] heads go, the logits stay
        assert torch.equal(loaded(x), model(x)) and not any(k.startswith("head_cls") for k in loaded.state_dict())
    ref["stage_blocks.0.m.qkv.c.weight"] = ref["stage_blocks.0.m.qkv.c.weight"] + 1
    with pytest.raises(UserInputError, match="two different tensors for 'stages.0.blocks.0.attn.qkv.linear.weight'"):
        reference_to_ours(ref, model.depth, model.pruned_layers)


def test_fused_logits_equal_unfused():
    """fuse_levit applies: the layers are timm's LinearNorm/ConvNorm/NormLinear."""
    model = randomise(make("evo_levit_128s", 224)).eval()
    fused = fuse_levit(model)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)


def test_bad_input(tmp_path):
    with pytest.raises(UserInputError, match="built for 64×64 images .* got \\(32, 32\\)"):
        make("evo_levit_128s", 64).eval()(torch.randn(1, 3, 32, 32))
    with pytest.raises(UserInputError, match="img_size=200 is not a multiple of 16"):
        make("evo_levit_128s", 200)
    with pytest.raises(UserInputError, match="Unknown Evo-LeViT model 'evo_levit_999'"):
        create_evo_levit("evo_levit_999", [1], [1])
    with pytest.raises(UserInputError, match="prune_ratios has 3 entries .* expected one per layer \\(9\\)"):
        create_evo_levit("evo_levit_128s", [1, 1, 0.5], [0.5] * 3)
    with pytest.raises(UserInputError, match="full layers \\(ratio 1\\) must come before"):
        create_evo_levit("evo_levit_128s", [1, 1, 0.5, 1, 0.5, 0.5, 0.5, 0.5, 0.5], [0.5] * 3)
    torch.save(make("evo_levit_256", 64).state_dict(), tmp_path / "evo_levit_256.pth")
    with pytest.raises(UserInputError,
                       match=r"does not fit the model: cls_token has shape \(1, 1, 256\) in the file but \(1, 1, 128\)"):
        make("evo_levit_128s", 64, pretrained_path=str(tmp_path / "evo_levit_256.pth"))
    torch.save(timm.create_model("levit_128s").state_dict(), tmp_path / "levit_128s.pth")
    with pytest.raises(UserInputError, match="does not fit the model: missing 'cls_token'"):
        make("evo_levit_128s", 224, pretrained_path=str(tmp_path / "levit_128s.pth"))


def test_distillation_loss_averages_the_two_head_pairs():
    """Evo-ViT levit/losses_levit.py type 'cls': base and distillation terms each averaged over
    the (mean-pool, [CLS]) pairs."""
    torch.manual_seed(0)
    outs = [torch.randn(4, 5) for _ in range(4)]
    y, teacher = torch.tensor([0, 1, 2, 3]), torch.randn(4, 5)
    heads = Heads(outs[0], dist=outs[1], aux_cls=outs[2], aux_dist=outs[3])
    total, parts = DeiTDistillationLoss(kind="hard", alpha=0.5)(heads, teacher, y, nn.CrossEntropyLoss())
    ce = nn.functional.cross_entropy
    base = (ce(outs[0], y) + ce(outs[2], y)) / 2
    dist = (ce(outs[1], teacher.argmax(1)) + ce(outs[3], teacher.argmax(1))) / 2
    torch.testing.assert_close(total, 0.5 * base + 0.5 * dist)
    torch.testing.assert_close(parts["train/loss_base"], base)


def test_distilled_training_heads_and_eval_rule():
    """In distilled training the four heads come apart; otherwise each class head is averaged with
    its distillation head, as at evaluation, where the auxiliary [CLS] heads are not used."""
    model = create_evo_levit("evo_levit_128s", [1, 1] + [0.5] * 7, [0.5] * 3, num_classes=7, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    model.set_distilled_training(True)
    heads = model.train()(x)
    assert all(t.shape == (2, 7) for t in (heads.main, heads.dist, heads.aux_cls, heads.aux_dist))
    model.set_distilled_training(False)
    averaged = model(x)
    torch.testing.assert_close(averaged.main, (heads.main + heads.dist) / 2)
    torch.testing.assert_close(averaged.aux_cls, (heads.aux_cls + heads.aux_dist) / 2)
    assert averaged.dist is None and averaged.aux_dist is None
    with torch.no_grad():
        eval_logits = model.eval()(x)
        feat = model.forward_features(x)[:, 1:].mean(dim=1)
    torch.testing.assert_close(eval_logits, (model.head(feat) + model.head_dist(feat)) / 2)


def test_short_fit_with_distillation_and_layer_to_stage_switch(tmp_path):
    """model=evo_levit_128s on digits (32²) through the pipeline: four heads into the distillation
    loss, layer-wise selection in epoch 0 and stage-wise from epoch 1 (evo_stage_epoch)."""
    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg = make_cfg(tmp_path / "run", [*QUIET, "model=evo_levit_128s", "data.image_size=32", "callbacks=distill",
                                      "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
                                      "callbacks.distillation.teacher=resnet10t",
                                      f"callbacks.distillation.teacher_path={tmp_path / 'teacher.pth'}",
                                      "+callbacks.keep_rate_schedule._target_=callbacks.keep_rate.KeepRateSchedule",
                                      "+callbacks.keep_rate_schedule.target=0.5",
                                      "+callbacks.keep_rate_schedule.start_epoch=0",
                                      "+callbacks.keep_rate_schedule.epochs=0",
                                      "+callbacks.keep_rate_schedule.shape=step",
                                      "+callbacks.keep_rate_schedule.evo_stage_epoch=1",
                                      "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                                      "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "test=false"])
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, pl_module.layerwise))

    datamodule, module, trainer = build(cfg)
    trainer.callbacks.append(Spy())
    trainer.fit(module, datamodule=datamodule)
    assert seen == [(0, True), (0, True), (1, False), (1, False)]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["train/loss_distill_epoch"] > 0 and metrics["train/loss_base_epoch"] > 0 and "val/acc1" in metrics



def test_run_keep_rate_reaches_the_model_and_its_ema(tmp_path):
    """keep_rate=… sets every pruned layer's and stage's ratio at build time, so the EMA copy and a
    fresh build for evaluation use it too (the reference's 0.5 is the default)."""
    import hydra
    default = make_cfg(tmp_path, ["model=evo_levit_128s", "data=synthetic", "data.image_size=64"])
    assert default.keep_rate == 0.5
    cfg = make_cfg(tmp_path, ["model=evo_levit_128s", "data=synthetic", "data.image_size=64", "keep_rate=0.7",
                              "module.ema_decay=0.99"])
    module = hydra.utils.instantiate(cfg.module)
    for net in (module.net, module.ema.module):
        assert net.keep_rate == 0.7
        assert net.stage_prune_ratios == [0.7] * 3 and net.prune_ratios[:2] == [1.0, 1.0]
        assert set(net.prune_ratios[2:]) == {0.7}
