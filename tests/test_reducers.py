"""EViT, Evo-ViT and ToMe on timm ViTs: equal to the reference algorithms, token counts, gradients."""
import pytest
import timm
import torch

from accel.backbones import with_reducer
from accel.errors import UserInputError
from accel.reducers import EViT, EvoViT, ToMe
from accel.reducers.evo_checkpoint import evo_to_timm, timm_to_evo
from reference_oracles import evit_forward, evo_forward, tome_forward

torch.manual_seed(0)
IMAGES = torch.randn(2, 3, 224, 224)


@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.fixture(scope="module")
def deit_t_distilled():
    torch.manual_seed(1)
    return timm.create_model("deit_tiny_distilled_patch16_224").eval()


def block_inputs(model, images):
    """Number of tokens entering each block."""
    counts = []
    hooks = [blk.norm1.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for blk in model.vit.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("reducer", [lambda: EViT(1.0), lambda: ToMe(r=0), lambda: EViT(0.7, locations=())],
                         ids=["evit_kr1", "tome_r0", "evit_no_locations"])
def test_no_reduction_is_exactly_timm(deit_s, reducer):
    with torch.no_grad():
        assert torch.equal(with_reducer(deit_s, reducer()).eval()(IMAGES), deit_s(IMAGES))


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_reference(deit_s, fuse):
    model = with_reducer(deit_s, EViT(0.7, fuse_token=fuse)).eval()
    with torch.no_grad():
        ours, ref = model(IMAGES), evit_forward(deit_s, IMAGES, 0.7, fuse=fuse)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_evit_token_counts_deit_s(deit_s):
    counts = block_inputs(with_reducer(deit_s, EViT(0.7)), IMAGES)
    assert counts == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2


def test_evit_keeps_dist_token(deit_t_distilled):
    model = with_reducer(deit_t_distilled, EViT(0.7)).eval()
    counts = block_inputs(model, IMAGES)
    # [CLS] + DIST are kept on top of ceil(.7·196)=138 patches + the fused token.
    assert counts == [198] * 4 + [141] * 3 + [101] * 3 + [73] * 2
    assert all(int(s["kept"].max()) < 196 for s in model.last_selection[:1])


def test_tome_matches_reference_and_counts(deit_s):
    model = with_reducer(deit_s, ToMe(r=13)).eval()
    with torch.no_grad():
        ours, ref = model(IMAGES), tome_forward(deit_s, IMAGES, [13] * 12)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    counts = block_inputs(model, IMAGES)
    assert counts == [197 - 13 * i for i in range(12)]
    assert model.last_selection[-1]["size"].shape[1] == 41
    assert float(model.last_selection[-1]["size"].sum(dim=1).mean()) == 197


def test_tome_protects_dist_token(deit_t_distilled):
    model = with_reducer(deit_t_distilled, ToMe(r=8)).eval()
    with torch.no_grad():
        ours, ref = model(IMAGES), tome_forward(deit_t_distilled, IMAGES, [8] * 12, distilled=True)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def tome_schedule(**kwargs):
    return with_reducer(timm.create_model("deit_tiny_patch16_224"), ToMe(**kwargs)).reducer.schedule


def test_tome_schedules():
    decreasing = tome_schedule(r=(8, -1.0))
    assert decreasing[0] == 16 and decreasing[-1] == 0 and decreasing == sorted(decreasing, reverse=True)
    assert tome_schedule(r=[5, 5]) == [5, 5] + [0] * 10
    assert sum(tome_schedule(r=None, keep_rate=0.4)) == round(0.6 * 196)
    model = with_reducer(timm.create_model("deit_tiny_patch16_224"), ToMe(r=13))
    model.set_keep_rate(1.0)
    assert model.reducer.schedule == [0] * 12


@pytest.fixture(scope="module")
def evo_checkpoint():
    """A random Evo-ViT-S checkpoint in Evo-ViT's own naming."""
    torch.manual_seed(2)
    vit = timm.create_model("deit_small_patch16_224")
    sd = {k: v + 0.0 for k, v in vit.state_dict().items()}
    sd.update({"reducer.head_cls.weight": torch.randn(1000, 384) * 0.02, "reducer.head_cls.bias": torch.randn(1000) * 0.02,
               "reducer.norm_cls.weight": 1 + 0.1 * torch.randn(384), "reducer.norm_cls.bias": 0.1 * torch.randn(384)})
    return timm_to_evo(sd)


def evo_model(evo_sd, **kwargs):
    vit = timm.create_model("deit_small_patch16_224")
    model = with_reducer(vit, EvoViT(0.5, **kwargs))
    model.load_state_dict(evo_to_timm(evo_sd))
    return model


def test_evo_checkpoint_converter_round_trips(evo_checkpoint):
    back = timm_to_evo(evo_to_timm(evo_checkpoint))
    assert back.keys() == evo_checkpoint.keys()
    assert all(torch.equal(back[k], evo_checkpoint[k]) for k in back)
    assert "qks.3.qk.weight" in evo_checkpoint and "head_cls.weight" in evo_checkpoint


def test_evo_matches_reference_stagewise_inference(evo_checkpoint):
    model = evo_model(evo_checkpoint).eval()
    with torch.no_grad():
        ours, ref = model(IMAGES), evo_forward(evo_checkpoint, IMAGES, heads=6, patch=16)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert block_inputs(model, IMAGES) == [197] * 4 + [99] * 8


def test_evo_matches_reference_layerwise_training(evo_checkpoint):
    model = evo_model(evo_checkpoint).train()
    ours = model(IMAGES)
    ref = evo_forward(evo_checkpoint, IMAGES, heads=6, patch=16, training=True)
    assert isinstance(ours, tuple) and len(ours) == 2
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_evo_keep_rate_1_is_timm_blocks_with_mean_pool_head(deit_s):
    model = with_reducer(deit_s, EvoViT(1.0)).eval()
    with torch.no_grad():
        feats = deit_s.forward_features(IMAGES)  # timm norms every token; Evo norms the mean
        x = deit_s.patch_embed(IMAGES)
        x = deit_s.blocks(deit_s._pos_embed(x))
        expected = deit_s.head(deit_s.norm(x[:, 1:].mean(1)))
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=0)
    assert feats.shape[1] == 197


def test_evo_representative_fast_path_updates_placeholders(deit_s):
    model = with_reducer(deit_s, EvoViT(0.5, fast_path="representative")).eval()
    plain = with_reducer(deit_s, EvoViT(0.5, fast_path="none")).eval()
    with torch.no_grad():
        a, b = model(IMAGES), plain(IMAGES)
    assert a.shape == b.shape and not torch.allclose(a, b)
    # The representative token rides along: 99 slow tokens + 1.
    assert block_inputs(model, IMAGES) == [197] * 4 + [100] * 8


@pytest.mark.parametrize("reducer", [lambda: EViT(0.7), lambda: EvoViT(0.5), lambda: ToMe(r=8)],
                         ids=["evit", "evo", "tome"])
def test_gradients_reach_parameters_with_drop_path(reducer):
    torch.manual_seed(3)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, drop_path_rate=0.1)
    model = with_reducer(vit, reducer()).train()
    out = model(torch.randn(4, 3, 64, 64))
    loss = sum(o.logsumexp(-1).mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "head.weight"):
        grad = dict(model.vit.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_timm_checkpoint_loads_unchanged(deit_s):
    fresh = with_reducer(timm.create_model("deit_small_patch16_224"), EViT(0.7))
    fresh.load_state_dict(deit_s.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(IMAGES), with_reducer(deit_s, EViT(0.7)).eval()(IMAGES), atol=0, rtol=0)


def test_set_keep_rate_at_run_time(deit_s):
    model = with_reducer(deit_s, EViT(0.7))
    model.set_keep_rate(0.5)
    assert model.keep_rate == 0.5
    assert block_inputs(model, IMAGES)[4] == 1 + 98 + 1
    with pytest.raises(UserInputError, match=r"keep_rate=1.2 is outside \(0, 1\]"):
        model.set_keep_rate(1.2)


@pytest.mark.parametrize("make, message", [
    (lambda: EViT(0.0), r"keep_rate=0.0 is outside \(0, 1\]"),
    (lambda: EViT(0.7, locations=(3, 12)), r"EViT locations \[3, 12\] include 12, outside the model's 12 blocks"),
    (lambda: ToMe(r=120), r"ToMe r=120 asks a block to merge 120 tokens but at most 98 can be merged at once"),
    (lambda: EvoViT(0.5, start=12), r"Evo-ViT start=12 is outside the model's 12 blocks"),
    (lambda: EvoViT(0.5, fast_path="fast"), r"fast_path='fast' is unknown"),
])
def test_bad_reducer_settings(make, message):
    with pytest.raises(UserInputError, match=message):
        with_reducer(timm.create_model("deit_small_patch16_224"), make())


@pytest.mark.parametrize("reducer", [EViT, EvoViT], ids=["evit", "evo"])
def test_cls_scored_reducer_needs_a_cls_token(reducer):
    vit = timm.create_model("vit_small_patch16_224", class_token=False, global_pool="avg")
    with pytest.raises(UserInputError, match=r"has no \[CLS\] token"):
        with_reducer(vit, reducer(0.5))


@pytest.mark.parametrize("make", [lambda e: EViT(0.7, explicit_attention=e), lambda e: EvoViT(0.5, explicit_attention=e),
                                  lambda e: ToMe(r=13, explicit_attention=e)], ids=["evit", "evo", "tome"])
def test_fused_attention_equals_explicit_matrix(deit_s, make):
    with torch.no_grad():
        fused = with_reducer(deit_s, make(False)).eval()(IMAGES)
        explicit = with_reducer(deit_s, make(True)).eval()(IMAGES)
    torch.testing.assert_close(fused, explicit, atol=1e-4, rtol=0)


def test_evo_release_file_loads_through_create_vit(tmp_path, evo_checkpoint):
    """model=evo_deit_s model.pretrained_path=<Evo-ViT release file> gives the reference logits."""
    from accel.backbones import create_vit
    torch.save({"model": evo_checkpoint}, tmp_path / "evo_vit_s.pth")
    vit = create_vit("deit_small_patch16_224", num_classes=1000, pretrained_path=str(tmp_path / "evo_vit_s.pth"))
    model = with_reducer(vit, EvoViT(0.5)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), evo_forward(evo_checkpoint, IMAGES, heads=6, patch=16),
                                   atol=1e-4, rtol=0)
