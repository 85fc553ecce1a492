"""Slide attention and Slide-Swin/PVTv2: the option without the deformed path equals im2col (F.unfold)
local attention, the fused CPU kernel equals the torch path, fallbacks, bad input. Parity with the authors'
code (two-path, re-parameterised, kernel; Slide-Swin-T logits; their checkpoint layout):
tests/test_reference_parity_pyramids.py."""
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


def test_slide_swin_trains_through_the_deformed_path_only():
    """The shift kernels stay fixed in training; the deformed-shift convolution learns."""
    from accel.backbones.slide_swin import create_slide_swin
    small = create_slide_swin("slide_swin_t", num_classes=5, img_size=64)
    out = small.train()(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    attn = small.layers[0].blocks[0].attn
    assert out.shape == (2, 5) and attn.dep_conv1.weight.grad is not None
    assert attn.dep_conv.weight.grad is None and not attn.dep_conv.weight.requires_grad


def test_slide_swin_bad_size():
    from accel.backbones.slide_swin import create_slide_swin
    from accel.errors import UserInputError
    with pytest.raises(UserInputError, match="img_size=200 is not a multiple of 32"):
        create_slide_swin("slide_swin_t", img_size=200)


@pytest.mark.parametrize("dim, heads, size", [(64, 2, (5, 7)), (64, 1, (9, 4)), (96, 3, (14, 14))])
def test_fused_kernel_equals_torch_path(dim, heads, size, monkeypatch):
    """The compiled CPU kernel (re-parameterised, inference) gives the torch path's outputs, borders
    included; it is what runs after reparameterize() on a CPU."""
    from accel.backbones import slide_kernel
    assert slide_kernel.available(), "CI machines have a C compiler; the fused kernel must build"
    torch.manual_seed(2)
    m = SlideAttention(dim, heads).eval()
    x = torch.randn(3, *size, dim)
    with torch.no_grad():
        two_paths = m(x)
        m.reparameterize()
        calls = []
        original = slide_kernel.slide_attention
        monkeypatch.setattr(slide_kernel, "slide_attention", lambda *a: calls.append(1) or original(*a))
        fused = m(x)
        monkeypatch.setattr(slide_kernel, "available", lambda: False)
        torch_path = m(x)
    assert calls, "the fused kernel was not used"
    torch.testing.assert_close(fused, two_paths, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch_path, two_paths, atol=1e-5, rtol=0)


def test_kernel_build_failure_falls_back_with_a_warning(tmp_path, monkeypatch):
    from accel.backbones import slide_kernel
    monkeypatch.setenv("ACCEL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")   # a "compiler" that always fails
    slide_kernel._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="slower torch path"):
            assert not slide_kernel.available()
        m = SlideAttention(32, 1).eval()
        m.reparameterize()
        with torch.no_grad():
            assert m(torch.randn(1, 4, 4, 32)).shape == (1, 4, 4, 32)
        assert not list(tmp_path.iterdir()), "a failed build leaves no file in the cache"
    finally:
        slide_kernel._library.cache_clear()


def test_slide_pvt_v2_has_slide_attention_in_early_stages_and_takes_any_size():
    from accel.backbones.slide_pvt import SlideTokenAttention, create_slide_pvt_v2
    from accel.backbones.slide_swin import reparameterize_slide
    assert sum(p.numel() for p in create_slide_pvt_v2("slide_pvt_v2_b1").parameters()) == 13_005_406   # paper: 13.0M
    torch.manual_seed(4)
    model = create_slide_pvt_v2("slide_pvt_v2_b2", num_classes=5)
    kinds = [type(stage.blocks[0].attn) for stage in model.stages]
    assert kinds[:2] == [SlideTokenAttention] * 2 and SlideTokenAttention not in kinds[2:]
    x = torch.randn(2, 3, 96, 80)   # no position embedding: a non-square size works
    out = model.train()(x)
    out.sum().backward()
    assert out.shape == (2, 5) and model.stages[1].blocks[0].attn.dep_conv1.weight.grad is not None
    with torch.no_grad():
        before = model.eval()(x)
        after = reparameterize_slide(model)(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_slide_swin_fused_whole_map_attention_equals_timm_explicit_path():
    """Stages 3-4 run through SDPA by default; logits and the position-table gradients are those of
    timm's explicit attention."""
    from accel.backbones.slide_swin import create_slide_swin
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = create_slide_swin("slide_swin_t", num_classes=5, img_size=64, fused_attn=fused, drop_path_rate=0.0)
        assert model.layers[2].blocks[0].attn.fused_attn is fused
        out = model.train()(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
        out.sum().backward()
        results.append((out.detach(), model.layers[2].blocks[0].attn.relative_position_bias_table.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)


def test_autocast_runs_the_torch_path_not_the_float32_kernel(monkeypatch):
    """Under CPU autocast the qkv projection is bf16; the float32 kernel must not see it."""
    from accel.backbones import slide_kernel
    torch.manual_seed(5)
    m = SlideAttention(64, 2).eval()
    x = torch.randn(2, 9, 7, 64)
    with torch.no_grad():
        reference = m(x)
        m.reparameterize()
        monkeypatch.setattr(slide_kernel, "slide_attention", lambda *a: pytest.fail("kernel called with bf16"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        monkeypatch.undo()
        slide_kernel.slide_attention(torch.zeros(1, 2, 2, 96, dtype=torch.bfloat16), *m._kernel_weights, 2, 3, 1.0)


def test_reparameterised_module_runs_under_torch_compile():
    """torch.compile (as `benchmark.py --compile`) traces around the kernel instead of failing on it."""
    torch.manual_seed(6)
    m = SlideAttention(64, 2).eval()
    m.reparameterize()
    x = torch.randn(2, 6, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="eager")(x), m(x), atol=1e-6, rtol=0)
