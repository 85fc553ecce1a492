"""DeiT backbones from timm names; local checkpoints in timm and DeiT-release formats."""
import pytest
import timm
import torch

from accel.backbones import create_vit, with_reducer
from accel.errors import UserInputError
from accel.reducers import TokenReducer

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)


def test_deit_variants_take_image_size_and_class_count():
    m = create_vit("deit_small_distilled_patch16_224", num_classes=7, img_size=64, drop_path_rate=0.1)
    assert m.num_classes == 7 and m.patch_embed.img_size == (64, 64) and m.num_prefix_tokens == 2
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_model_name():
    with pytest.raises(UserInputError, match="Unknown timm model 'deit_smal_patch16_224'"):
        create_vit("deit_smal_patch16_224")


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd}], ids=["timm", "deit_release"])
def test_pretrained_path_loads_both_formats(tmp_path, wrap):
    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, **TINY)
    torch.save(wrap(src.state_dict()), tmp_path / "w.pth")
    m = create_vit("deit_tiny_patch16_224", num_classes=10, img_size=32, pretrained_path=str(tmp_path / "w.pth"), **TINY)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.eval()(x), src.eval()(x))


def test_pretrained_other_classes_and_size_resizes_pos_embed_and_reinits_head(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", num_classes=1000, img_size=32, **TINY)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    m = create_vit("deit_tiny_patch16_224", num_classes=10, img_size=64, pretrained_path=str(tmp_path / "w.pth"), **TINY)
    assert m.pos_embed.shape == (1, 1 + 64, 64)
    assert torch.equal(m.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(m.pos_embed[:, 0], src.pos_embed[:, 0]), "the [CLS] position is kept"
    assert m.head.weight.shape == (10, 64)


def test_missing_pretrained_file():
    with pytest.raises(UserInputError, match="Checkpoint file '/nope.pth' does not exist"):
        create_vit("deit_tiny_patch16_224", pretrained_path="/nope.pth", **TINY)


def test_pretrained_shape_mismatch_names_key(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, **{**TINY, "embed_dim": 32})
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserInputError, match=r"does not fit the model: .* has shape .* in the file but .* in the model"):
        create_vit("deit_tiny_patch16_224", num_classes=10, img_size=32, pretrained_path=str(tmp_path / "w.pth"), **TINY)


def test_identity_reducer_gives_timm_logits_and_timm_state_dict():
    vit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, **TINY).eval()
    wrapped = with_reducer(vit, TokenReducer()).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(wrapped(x), vit(x))
    assert list(wrapped.state_dict()) == list(vit.state_dict())
    fresh = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, **TINY)
    with_reducer(fresh, TokenReducer()).load_state_dict(vit.state_dict())
    assert torch.equal(fresh.eval()(x), vit(x))
