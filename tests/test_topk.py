"""Top-K pruning (accel/reducers/topk.py + conf/reducer/topk.yaml): the fourth reducer, added as one
file and one yaml. It keeps Haurum et al.'s cumulative count of tokens and, with EViT's count
(cumulative=False), equals EViT without fusion. Its parity with Haurum et al.'s code is in
test_reference_parity_haurum.py."""
import pytest
import timm
import torch

from accel.backbones import with_reducer
from accel.errors import UserInputError
from accel.reducers import EViT, KeptTokens
from accel.reducers.topk import TopK
from conftest import make_cfg
from pipeline import instantiate


def test_config_keeps_the_right_count_per_block(tmp_path):
    """reducer=topk on the default model (16 image tokens, 6 blocks): int(16·kr^(s+1)) kept at blocks 1 and 3."""
    cfg = make_cfg(tmp_path, ["reducer=topk", "reducer.locations=[1,3]", "keep_rate=0.5"])
    net = instantiate(cfg.module).net.eval()
    assert isinstance(net.reducer, TopK) and net.keep_rate == 0.5
    counts = []
    hooks = [blk.norm2.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for blk in net.vit.blocks]
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert counts == [17, 1 + 8, 9, 1 + 4, 5, 5]        # tokens into each block's MLP: [CLS] + kept patches
    assert [(type(s), s.block, s.kept.shape[1]) for s in net.selections] == [(KeptTokens, 1, 8), (KeptTokens, 3, 4)]
    net.set_keep_rate(0.75)                             # schedules change it between batches
    counts.clear()
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    assert counts == [17, 13, 13, 10, 10, 10]           # int(16·.75) = 12, int(16·.75²) = 9
    for h in hooks:
        h.remove()


def test_counts_are_haurum_et_al_s_cumulative_ones_or_evit_s():
    """DeiT-S at keep rate 0.7: int(196·.7^(s+1)) = 137, 96, 67 (Haurum et al.'s train.py), not EViT's
    ceil(kr·n) = 138, 97, 68."""
    vit = timm.create_model("deit_tiny_patch16_224", depth=10)
    cumulative, evit_rule = TopK(0.7), TopK(0.7, cumulative=False)
    for reducer in (cumulative, evit_rule):
        with_reducer(vit, reducer)
    assert [cumulative.kept_count(i, n) for i, n in [(3, 196), (6, 137), (9, 96)]] == [137, 96, 67]
    assert [evit_rule.kept_count(i, n) for i, n in [(3, 196), (6, 138), (9, 97)]] == [138, 97, 68]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_equals_evit_without_fusion(name):
    torch.manual_seed(0)
    vit = timm.create_model(name, img_size=64, patch_size=8, depth=6).eval()
    images = torch.randn(2, 3, 64, 64)
    topk = with_reducer(vit, TopK(0.6, locations=(1, 3), cumulative=False)).eval()
    evit = with_reducer(vit, EViT(0.6, (1, 3), fuse_token=False)).eval()
    with torch.no_grad():
        assert torch.equal(topk(images), evit(images))
    assert all(torch.equal(a.kept, b.kept) for a, b in zip(topk.selections, evit.selections))


def test_bad_locations():
    with pytest.raises(UserInputError, match=r"Top-K locations=\[3, 6\]: expected .* below its 6 blocks"):
        with_reducer(timm.create_model("deit_tiny_patch16_224", depth=6), TopK(0.5, locations=(3, 6)))
