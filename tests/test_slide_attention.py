"""Slide attention: equals im2col (F.unfold) local attention with the deformed path off; the merged
convolution equals the two-path module."""
import pytest
import torch
import torch.nn.functional as F

from accel.backbones.slide_attention import SlideAttention


def unfold_local_attention(m: SlideAttention, x: torch.Tensor) -> torch.Tensor:
    """Zero-padded ka×ka local attention by im2col, from the module's own weights."""
    B, H, W, C = x.shape
    nh, hd, ka = m.num_heads, m.head_dim, m.ka
    qkv = m.qkv(x).permute(0, 3, 1, 2).reshape(B * nh, 3 * hd, H, W)
    q, k, v = qkv.split(hd, dim=1)
    k_nb = F.unfold(k, ka, padding=ka // 2).reshape(B, nh, hd, ka * ka, H, W)
    v_nb = F.unfold(v, ka, padding=ka // 2).reshape(B, nh, hd, ka * ka, H, W)
    k_nb = k_nb + m.relative_position_bias_table
    logits = torch.einsum("bndhw,bndshw->bnshw", q.reshape(B, nh, hd, H, W) * m.scale, k_nb)
    out = torch.einsum("bnshw,bndshw->bndhw", logits.softmax(dim=2), v_nb)
    return m.proj(out.reshape(B, C, H, W).permute(0, 2, 3, 1))


@pytest.mark.parametrize("dim, heads, size", [(64, 2, (14, 14)), (96, 3, (7, 9))])
def test_equals_unfold_local_attention_without_deformed_path(dim, heads, size):
    torch.manual_seed(0)
    m = SlideAttention(dim, heads, use_deform=False).eval()
    torch.nn.init.zeros_(m.dep_conv.bias)
    x = torch.randn(2, *size, dim)
    with torch.no_grad():
        torch.testing.assert_close(m(x), unfold_local_attention(m, x), atol=1e-5, rtol=1e-5)


def test_reparameterised_equals_two_paths():
    torch.manual_seed(1)
    m = SlideAttention(96, 3).eval()
    x = torch.randn(4, 14, 14, 96)
    with torch.no_grad():
        two_paths = m(x)
        m.reparameterize()
        merged = m(x)
    torch.testing.assert_close(merged, two_paths, atol=1e-5, rtol=0)
    assert m.dep_conv.weight.requires_grad is False and m.dep_conv1.weight.requires_grad


def test_shift_path_is_fixed_and_deformed_path_learns():
    m = SlideAttention(32, 2)
    out = m(torch.randn(1, 6, 6, 32))
    out.sum().backward()
    assert m.dep_conv.weight.grad is None
    assert m.dep_conv1.weight.grad is not None and m.relative_position_bias_table.grad is not None
    names = set(m.state_dict())
    assert {"qkv.weight", "dep_conv.weight", "dep_conv.bias", "dep_conv1.weight", "relative_position_bias_table",
            "proj.weight"} <= names, "the reference repository's parameter names"


def test_slide_swin_t_matches_reference_size_and_trains():
    from accel.backbones.slide_swin import create_slide_swin, reparameterize_slide
    model = create_slide_swin("slide_swin_t")
    assert sum(p.numel() for p in model.parameters()) == 28_348_834   # the reference model's count
    small = create_slide_swin("slide_swin_t", num_classes=5, img_size=64)
    out = small.train()(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 5) and small.layers[0].blocks[0].attn.slide.dep_conv1.weight.grad is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = small.eval()(x)
        after = reparameterize_slide(small)(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_slide_swin_bad_size():
    from accel.backbones.slide_swin import create_slide_swin
    from accel.errors import UserInputError
    with pytest.raises(UserInputError, match="img_size=200 is not a multiple of 32"):
        create_slide_swin("slide_swin_t", img_size=200)
