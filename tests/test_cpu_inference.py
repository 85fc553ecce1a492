"""Packed oneDNN linears for CPU inference: same logits, original untouched, no training."""
import pytest
import timm
import torch
from torch import nn

from accel.backbones import with_reducer
from accel.cpu_inference import PackedLinear, PackedMlp, available, pack_for_cpu_inference
from accel.errors import UserInputError
from accel.reducers import EViT, EvoViT, ToMe



def test_onednn_kernels_are_available():
    assert available(), "the pinned torch build ships oneDNN; packing needs it"


@pytest.mark.parametrize("reducer", [None, lambda: EViT(0.7), lambda: EvoViT(0.5), lambda: ToMe(r=8)],
                         ids=["timm", "evit", "evo", "tome"])
def test_packed_model_gives_the_same_logits(reducer):
    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_distilled_patch16_224" if reducer is None else "deit_tiny_patch16_224",
                            img_size=96, patch_size=8)
    if reducer is not None:
        net = with_reducer(net, reducer())
    net.eval()
    packed = pack_for_cpu_inference(net)
    x = torch.randn(3, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), net(x), atol=1e-4, rtol=1e-4)
    vit = getattr(packed, "vit", packed)
    assert isinstance(vit.blocks[0].mlp, PackedMlp) and isinstance(vit.blocks[0].attn.qkv, PackedLinear)
    original = getattr(net, "vit", net)
    assert isinstance(original.blocks[0].mlp.fc1, nn.Linear), "the original model is left as it was"


def test_packed_model_refuses_training():
    packed = pack_for_cpu_inference(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8))
    with pytest.raises(UserInputError, match="cannot be trained"):
        packed(torch.randn(1, 3, 32, 32, requires_grad=True))
