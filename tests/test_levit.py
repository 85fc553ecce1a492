"""LeViT: configs, BatchNorm fusion, official checkpoint names, attention-bias cache, bad input."""
import pytest
import timm
import torch
from torch import nn

from accel.backbones import create_levit, fuse_levit
from accel.backbones.levit_names import official_to_timm, timm_to_official
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


@pytest.mark.parametrize("name", ["levit_128s", "levit_256"])
def test_fused_logits_equal_unfused(name):
    model = randomise_bn(create_levit(name)).eval()
    fused = fuse_levit(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=0)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()), "the original stays unfused"


def test_official_names_round_trip_and_load(tmp_path):
    src = randomise_bn(timm.create_model("levit_128s")).eval()
    official = timm_to_official(src.state_dict())
    assert "patch_embed.0.c.weight" in official and "blocks.0.m.qkv.c.weight" in official
    assert "blocks.4.kv.c.weight" in official and "blocks.5.m.0.c.weight" in official and "head.l.weight" in official
    back = official_to_timm(official, src.state_dict().keys())
    assert back.keys() == src.state_dict().keys() and all(torch.equal(back[k], v) for k, v in src.state_dict().items())
    torch.save({"model": official}, tmp_path / "LeViT-128S.pth")
    loaded = create_levit("levit_128s", pretrained_path=str(tmp_path / "LeViT-128S.pth")).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


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
