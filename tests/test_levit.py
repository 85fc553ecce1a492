"""LeViT: configs, BatchNorm fusion, attention-bias cache, bad input. Parity with the authors' code and their
checkpoint names: tests/test_reference_parity_pyramids.py."""
import pytest
import timm
import torch
from torch import nn

from accel.backbones import create_levit, fuse_levit
from accel.errors import UserInputError

NAMES = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]


def randomise_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.1)
            m.bias.data.normal_(0, 0.1)
        if hasattr(m, "attention_biases"):
            m.attention_biases.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_levit_forward_backward_and_distilled_heads(name):
    model = create_levit(name, num_classes=7, img_size=64)
    model.set_distilled_training(True)
    cls, dist = model.train()(torch.randn(2, 3, 64, 64))
    (cls.sum() + dist.sum()).backward()
    assert cls.shape == dist.shape == (2, 7)
    assert model.stem.conv1.linear.weight.grad is not None
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)


def test_fused_logits_equal_unfused():
    """LeViT-128S's fused logits equal the authors' (test_reference_parity_pyramids.py); here another size."""
    model = randomise_bn(create_levit("levit_256")).eval()
    fused = fuse_levit(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=0)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()), "the original stays unfused"


def test_weights_loaded_after_eval_are_used(tmp_path):
    """The eval-mode attention-bias cache must not keep the biases from before a load."""
    src = randomise_bn(timm.create_model("levit_128s")).eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_levit("levit_128s").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # fills the cache with the initial biases
        model.load_state_dict(torch.load(tmp_path / "w.pth"))
        from accel.backbones.levit import clear_attention_bias_cache
        clear_attention_bias_cache(model)
        assert torch.equal(model(x), src(x))
        fresh = create_levit("levit_128s", pretrained_path=str(tmp_path / "w.pth")).eval()
        assert torch.equal(fresh(x), src(x))


def test_bad_image_size_and_foreign_checkpoint(tmp_path):
    with pytest.raises(UserInputError, match="LeViT img_size=200 is not a multiple of 16"):
        create_levit("levit_128s", img_size=200)
    torch.save(timm.create_model("levit_256").state_dict(), tmp_path / "levit_256.pth")
    with pytest.raises(UserInputError, match=r"does not fit the model: stem.conv1.linear.weight has shape"):
        create_levit("levit_128s", pretrained_path=str(tmp_path / "levit_256.pth"))
    with pytest.raises(UserInputError, match="Unknown LeViT model 'levit_999'"):
        create_levit("levit_999")


def test_levit_recipe_uses_the_reference_optimiser_settings_and_adaptive_clipping(tmp_path):
    """experiment=levit_256_in1k carries LeViT main.py's defaults, and its AGC clipping really
    rescales gradients inside a Lightning optimisation step."""
    import hydra
    import pytorch_lightning as pl
    from timm.utils.agc import adaptive_clip_grad
    from conftest import make_cfg, write_jpeg_folder
    cfg = make_cfg(tmp_path, ["experiment=levit_256_in1k", f"data.root={write_jpeg_folder(tmp_path / 'in')}",
                              "data.num_classes=2"])
    m = cfg.module
    assert (m.lr, m.agc_clip, m.optimizer.weight_decay, m.ema_decay) == (5e-4, 0.01, 0.025, 0.99996)
    assert (m.scheduler.lr_min, m.scheduler.warmup_lr_init, cfg.trainer.max_epochs) == (1e-5, 1e-6, 1000)
    assert (cfg.data.batch_size, cfg.data.repeated_aug, cfg.callbacks.distillation.kind) == (256, 3, "hard")

    cfg = make_cfg(tmp_path, ["model=levit_128s", "data=synthetic", "data.image_size=64", "data.num_classes=3",
                              "module.agc_clip=0.01", "module.mixup.mixup_alpha=0", "module.mixup.cutmix_alpha=0"])
    module = hydra.utils.instantiate(cfg.module)
    torch.manual_seed(0)
    images, targets = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    module.loss(module.net.train()(images), targets).backward()
    raw = [p.grad.clone() for p in module.net.parameters()]
    expected = [g.clone() for g in raw]
    params = [p.detach().clone().requires_grad_() for p in module.net.parameters()]
    for p, g in zip(params, expected):
        p.grad = g
    adaptive_clip_grad(params, clip_factor=0.01)
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    module.configure_gradient_clipping(None)
    clipped = [p.grad for p in module.net.parameters()]
    assert any(not torch.equal(c, r) for c, r in zip(clipped, raw)), "AGC at 0.01 must clip some gradients"
    assert all(torch.allclose(c, p.grad) for c, p in zip(clipped, params))
