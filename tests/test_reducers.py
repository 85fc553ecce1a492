"""EViT, Evo-ViT and ToMe on timm ViTs: token counts, keep rates, gradients, Evo-ViT against its re-statement.

EViT and ToMe are compared with the authors' own outputs in test_reference_parity_evit_tome.py."""
import pytest
import timm
import torch

from accel.backbones import with_reducer
from accel.errors import UserInputError
from accel.reducers import EViT, EvoViT, ToMe
from accel.reducers.evo_checkpoint import evo_to_timm, timm_to_evo
from conftest import make_cfg
from pipeline import instantiate

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


def test_evit_token_counts_deit_s(deit_s):
    counts = block_inputs(with_reducer(deit_s, EViT(0.7)), IMAGES)
    assert counts == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2


def test_evit_keeps_dist_token(deit_t_distilled):
    model = with_reducer(deit_t_distilled, EViT(0.7)).eval()
    counts = block_inputs(model, IMAGES)
    # [CLS] + DIST are kept on top of ceil(.7·196)=138 patches + the fused token.
    assert counts == [198] * 4 + [141] * 3 + [101] * 3 + [73] * 2
    assert all(int(s.kept.max()) < 196 for s in model.selections[:1])


def test_tome_token_counts_deit_s(deit_s):
    model = with_reducer(deit_s, ToMe(r=13)).eval()
    counts = block_inputs(model, IMAGES)
    assert counts == [197 - 13 * i for i in range(12)]
    assert model.selections[-1].size.shape[1] == 41
    assert float(model.selections[-1].size.sum(dim=1).mean()) == 197


def test_tome_keeps_cls_and_dist_first_and_unmerged(deit_t_distilled):
    """timm's heads read [CLS] at 0 and DIST at 1: after every merge those positions hold exactly them."""
    model = with_reducer(deit_t_distilled, ToMe(r=8, trace_source=True)).eval()
    with torch.no_grad():
        model(IMAGES)
    assert len(model.selections) == 12
    for entry in model.selections:
        source = entry.source                          # [B, tokens, input tokens]: which inputs each token holds
        assert torch.equal(source[:, 0], torch.eye(198)[0].expand(2, -1)), entry.block
        assert torch.equal(source[:, 1], torch.eye(198)[1].expand(2, -1)), entry.block


def tome_schedule(**kwargs):
    return with_reducer(timm.create_model("deit_tiny_patch16_224"), ToMe(**kwargs)).reducer.schedule


def test_tome_schedules():
    decreasing = tome_schedule(r=(8, -1.0))
    assert decreasing[0] == 16 and decreasing[-1] == 0 and decreasing == sorted(decreasing, reverse=True)
    assert tome_schedule(r=[5, 5]) == [5, 5] + [0] * 10
    assert sum(tome_schedule(r=None, keep_rate=0.4)) == round(0.6 * 196)


def small_vit(**kwargs):
    """DeiT-T blocks on 64 px images with 8 px patches: 64 image tokens."""
    torch.manual_seed(4)
    return timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, **kwargs).eval()


def tokens_after_last_block(model, images):
    with torch.no_grad():
        model(images)
    merges = [s for s in model.selections if s.block == 11]
    return merges[0].size.shape[1] if merges else None


def test_tome_keep_rate_schedule_drives_merging():
    """keep_rate for ToMe (r=null) = fraction of image tokens left after the last block, at every
    value a keep-rate schedule sets (it calls set_keep_rate before each batch, from 1.0 down)."""
    model = with_reducer(small_vit(), ToMe(r=None)).eval()
    images = torch.randn(2, 3, 64, 64)
    model.set_keep_rate(1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.vit(images), atol=1e-5, rtol=0)   # nothing merged
    assert model.selections == []
    for keep_rate, image_tokens in [(0.75, 48), (0.5, 32), (0.25, 16)]:
        model.set_keep_rate(keep_rate)
        assert model.keep_rate == keep_rate
        assert tokens_after_last_block(model, images) == 1 + image_tokens
        assert sum(model.reducer.schedule) == 64 - image_tokens
    with pytest.raises(UserInputError, match=r"ToMe keep_rate=0.01 needs 63 of 64 image tokens merged, but r spread "
                                             r"over 12 blocks merges at most \d+; expected a larger keep_rate"):
        model.set_keep_rate(0.01)


def test_tome_explicit_r_is_never_dropped():
    with pytest.raises(UserInputError, match=r"ToMe got both r=13 and keep_rate=0.5, but an explicit r fixes how "
                                             r"many tokens merge; set reducer.r=null \(r=None\) to derive r"):
        ToMe(r=13, keep_rate=0.5)
    model = with_reducer(small_vit(), ToMe(r=4))
    model.set_keep_rate(1.0)           # what a keep-rate schedule starts with: the explicit r stays in charge
    assert model.reducer.schedule == [4] * 12 and model.reducer.r == 4
    assert tokens_after_last_block(model, torch.randn(2, 3, 64, 64)) == 1 + 64 - 48
    with pytest.raises(UserInputError, match=r"ToMe got both r=4 and keep_rate=0.7"):
        model.set_keep_rate(0.7)
    assert model.reducer.schedule == [4] * 12 and model.keep_rate == 1.0


def test_tome_config_keep_rate(tmp_path):
    """model=tome_deit_s is the paper's r=13; a keep rate (as keep_rate_lr searches) needs reducer.r=null."""
    small = ["data=synthetic", "data.image_size=64", "data.num_classes=3", "++model.patch_size=8"]
    with pytest.raises(UserInputError, match=r"ToMe got both r=13 and keep_rate=0.5"):
        instantiate(make_cfg(tmp_path, ["model=tome_deit_s", "keep_rate=0.5", *small]).module)
    net = instantiate(make_cfg(tmp_path, ["model=tome_deit_s", "reducer.r=null", "keep_rate=0.5", *small]).module).net
    assert sum(net.reducer.schedule) == 32
    assert tokens_after_last_block(net.eval(), torch.randn(1, 3, 64, 64)) == 1 + 32


@pytest.fixture(scope="module")
def evo_checkpoint():
    """A random Evo-ViT-S checkpoint in Evo-ViT's own naming."""
    torch.manual_seed(2)
    vit = timm.create_model("deit_small_patch16_224")
    sd = {k: v + 0.0 for k, v in vit.state_dict().items()}
    sd.update({"reducer.head_cls.weight": torch.randn(1000, 384) * 0.02, "reducer.head_cls.bias": torch.randn(1000) * 0.02,
               "reducer.norm_cls.weight": 1 + 0.1 * torch.randn(384), "reducer.norm_cls.bias": 0.1 * torch.randn(384)})
    return timm_to_evo(sd)


def test_evo_checkpoint_converter_round_trips(evo_checkpoint):
    back = timm_to_evo(evo_to_timm(evo_checkpoint))
    assert back.keys() == evo_checkpoint.keys()
    assert all(torch.equal(back[k], evo_checkpoint[k]) for k in back)
    assert "qks.3.qk.weight" in evo_checkpoint and "head_cls.weight" in evo_checkpoint


def test_evo_token_counts_deit_s(deit_s):
    """Evo-ViT-S at keep rate 0.5: every block from the 5th runs [CLS] + int(0.5·196) slow tokens."""
    model = with_reducer(deit_s, EvoViT(0.5)).eval()
    assert block_inputs(model, IMAGES) == [197] * 4 + [99] * 8


def test_evo_keep_rate_1_is_timm_blocks_with_mean_pool_head(deit_s):
    model = with_reducer(deit_s, EvoViT(1.0)).eval()
    with torch.no_grad():
        feats = deit_s.forward_features(IMAGES)  # timm norms every token; Evo norms the mean
        x = deit_s.patch_embed(IMAGES)
        x = deit_s.blocks(deit_s._pos_embed(x))
        expected = deit_s.head(deit_s.norm(x[:, 1:].mean(1)))
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=0)
    assert feats.shape[1] == 197


def test_evo_representative_fast_path_updates_placeholders():
    """Paper Sec. 3.3 fast path: the placeholders' attention-weighted mean runs through the stage's
    blocks beside the slow tokens, and every placeholder receives exactly that token's update."""
    vit = small_vit()
    model = with_reducer(vit, EvoViT(0.5, fast_path="representative")).eval()
    reducer, images = model.reducer, torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        state = reducer.reset(x, 1)
        for i in range(8):                     # through the first stage (blocks 4-7)
            if i == 4:
                before = x
            x, state = reducer.block(i, vit.blocks[i], x, state)
        sel = state["selections"][0]
        n_keep = sel.kept.shape[1]
        patches = before[:, 1:].gather(1, sel.source_index.unsqueeze(-1).expand(-1, -1, before.shape[-1]))
        slow, rest = torch.cat([before[:, :1], patches[:, :n_keep]], dim=1), patches[:, n_keep:]
        w = sel.global_attention[:, n_keep:]
        rep = torch.bmm((w / w.sum(1, keepdim=True)).unsqueeze(1), rest)
        seq = torch.cat([slow, rep], dim=1)
        for blk in vit.blocks[4:8]:            # timm's own blocks on [CLS, slow tokens, representative]
            seq = blk(seq)
        update = seq[:, -1:] - rep
    assert n_keep == 32 and update.abs().max() > 0.1
    torch.testing.assert_close(x[:, :1 + n_keep], seq[:, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 1 + n_keep:], rest + update, atol=1e-5, rtol=0)
    # The representative token rides along: 1 + 32 slow tokens + 1.
    assert block_inputs(model, images) == [65] * 4 + [34] * 8


@pytest.mark.parametrize("reducer", [lambda: EViT(0.7), lambda: EvoViT(0.5), lambda: ToMe(r=8)],
                         ids=["evit", "evo", "tome"])
def test_gradients_reach_parameters_with_drop_path(reducer):
    torch.manual_seed(3)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, drop_path_rate=0.1)
    model = with_reducer(vit, reducer()).train()
    heads = model(torch.randn(4, 3, 64, 64))
    loss = sum(h.logsumexp(-1).mean() for h in heads.tensors())
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
    (lambda: ToMe(r=[8, 8], keep_rate=0.9), r"ToMe got both r=\[8, 8\] and keep_rate=0.9"),
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
