"""bfloat16 autocast on the CPU: every token-reducing network's eval logits and selections against
float32, and ToMe's token sizes and proportional-attention mask.

Why the networks' attention is sharpened here: at random initialisation the [CLS] attention is
almost uniform (64 scores within ~0.1% of each other), below bfloat16's ~0.5% error on them, so
which tokens are kept is a near-tie that either precision may break either way. Scaling the query
and key weights by 3 gives the peaked attention of a trained network, with margins that bfloat16
preserves (Evo-LeViT: the logits scaled by 25). Where a selection still differs, the tokens exchanged must be near-ties in float32.

The clustering reducers (K-Medoids, DPC-KNN, PatchMerger) are left out: every token joins its nearest of
many centres, so at random weights bfloat16 moves a share of the tokens between clusters (K-Medoids
about half, its medoids start from near-tied attention sums) and no selection can be compared.

ATS samples the CDF of its scores at K points, so a block has some K decision boundaries instead of
top-k's one, and with 64 image tokens of scores within a factor 2 of each other some boundary always
lies within bfloat16's error of a sample: no image keeps exactly the float32 tokens, and ATS is exempt
from "half the images agree". Its exchanges must still be near-ties of the sampling (``sampled_ties``).
DiffRate's token sizes are similarity-weighted (not counts), so its selections are compared by the input
patches each token holds (traced), not by sizes.
"""
from __future__ import annotations

import timm
from timm.models.vision_transformer import Attention
import torch
import torch.nn.functional as F
import pytest

from accel.backbones import with_reducer
from accel.reducers import ToMe
from accel.reducers.selection import KeptTokens, MergedTokens, PrunedMergedTokens, SlowFastTokens
from small_nets import NAMES, build, images

BATCH = 8
# Logits of a sample whose selections agree: within 3% of the sample's largest |logit| (bfloat16
# keeps 8 significant bits, ~0.4% per rounding, over 6 blocks of matmuls and softmaxes).
LOGIT_RTOL = 0.03
# A kept/dropped swap is a near-tie when both tokens' float32 scores lie within 3% of the score at
# the cut (the scores' own bfloat16 error is ~0.5%).
TIE_RTOL = 0.03


def sharpened(name: str):
    net = build(name).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Attention):
                m.qkv.weight[:2 * m.num_heads * m.head_dim] *= 3  # rows of q and k
            elif hasattr(m, "key_dim") and hasattr(m, "scale"):
                m.scale *= 25  # Evo-LeViT: its BatchNorm-initialised q and k give flatter attention still
    return net


def run(net, x, bf16: bool):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = net(x).float()
    return out, list(net.selections)


def scores_by_patch(sel):
    """{patch index: float32 score} per sample, and the kept patch indices per sample."""
    if isinstance(sel, KeptTokens):
        scores, index = sel.scores, sel.source_index
    else:  # SlowFastTokens: global attention, in descending order
        scores, index = sel.global_attention, sel.source_index
    return ([dict(zip(i.tolist(), s.tolist())) for i, s in zip(index, scores.float())],
            [set(k.tolist()) for k in sel.kept])


def groups(sel: MergedTokens, sample: int):
    """The input patches each token holds, as a set of sets (order-free)."""
    return {frozenset(row.nonzero().flatten().tolist()) for row in sel.source[sample]}


def same_selection(a, b, sample: int) -> bool:
    if isinstance(a, PrunedMergedTokens):
        return groups(a, sample) == groups(b, sample)
    if isinstance(a, MergedTokens):
        return a.size.shape == b.size.shape and torch.equal(a.size[sample], b.size[sample])
    return set(a.kept[sample].tolist()) == set(b.kept[sample].tolist())


# Networks that sample their tokens from the CDF of their scores (ATS).
SAMPLED = {"ats", "ats_static"}


def sampled_ties(reducer, sel32: KeptTokens, sel16: KeptTokens, b: int) -> list:
    """The tokens ATS exchanged in image ``b`` that are not near-ties of its sampling. A token is a
    near-tie if (a) the other precision kept a token of float32 score within TIE_RTOL of its score in
    its place (the order of near-equal scores decides which sits at a sampled position), or (b) a sample
    point lies within TIE_RTOL of a neighbouring CDF step of the midpoint between its CDF value and a
    neighbour's (the error of one score moves that boundary past the sample)."""
    index, scores = sel32.source_index[b:b + 1], sel32.scores[b:b + 1]
    order, cdf, ys = reducer.cdf_samples(scores, index, reducer.grid[0] * reducer.grid[1])
    patch_at, cdf, ys = index[0][order[0]], cdf[0], ys[0]
    steps = cdf[1:] - cdf[:-1]
    near = (ys[None, :] - (cdf[1:] + cdf[:-1])[:, None] / 2).abs().min(dim=1).values <= TIE_RTOL * steps
    score = dict(zip(index[0].tolist(), scores[0].tolist()))
    kept32, kept16 = (set(s.kept[b][s.valid[b]].tolist()) for s in (sel32, sel16))
    far = []
    for j in kept32 ^ kept16:
        others = kept16 - kept32 if j in kept32 else kept32 - kept16
        t = int((patch_at == j).nonzero()[0])
        boundary = bool((t > 0 and near[t - 1]) or (t < len(near) and near[t]))
        if not boundary and all(abs(score[j] - score[o]) > TIE_RTOL * score[j] for o in others):
            far.append(j)
    return far


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("kmedoids", "dpcknn", "patchmerger")])
def test_bf16_eval_logits_and_selections_match_fp32(name):
    net = sharpened(name)
    net.set_tracing(True)  # DiffRate: the input patches of each token
    x = images(BATCH)
    ref, s32 = run(net, x, bf16=False)
    out, s16 = run(net, x, bf16=True)
    assert [type(s) for s in s16] == [type(s) for s in s32] and [s.block for s in s16] == [s.block for s in s32]
    agreeing = []
    for b in range(BATCH):
        first_diff = next((i for i, (p, q) in enumerate(zip(s32, s16)) if not same_selection(p, q, b)), None)
        if first_diff is None:
            agreeing.append(b)
            err = (out[b] - ref[b]).abs().max()
            assert err <= LOGIT_RTOL * ref[b].abs().max(), (b, float(err))
        elif name in SAMPLED:
            assert sampled_ties(net.reducer, s32[first_diff], s16[first_diff], b) == [], (b, first_diff)
        elif not isinstance(s32[first_diff], MergedTokens):
            # The first differing selection swapped only near-ties (later ones see other tokens).
            scores32, kept32 = scores_by_patch(s32[first_diff])
            _, kept16 = scores_by_patch(s16[first_diff])
            kept_scores = sorted((scores32[b][j] for j in kept32[b]), reverse=True)
            cut = kept_scores[-1]
            for j in kept32[b] ^ kept16[b]:
                assert abs(scores32[b][j] - cut) <= TIE_RTOL * cut, (b, first_diff, j, scores32[b][j], cut)
    # The fixed input has clear margins for most samples: at least half agree in every block.
    assert name in SAMPLED or len(agreeing) >= BATCH // 2, agreeing


def test_tome_sizes_and_mask_in_bf16_autocast(monkeypatch):
    """The additive mask SDPA receives is log(size) rounded once to bfloat16; sizes stay exact counts."""
    net = build("tome").eval()
    masks = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    x = images(2)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        net(x)
    sizes = [s.size for s in net.selections]
    # Block i > 0 attends with the sizes left by block i - 1.
    assert len(masks) == len(sizes) - 1
    for mask, size in zip(masks, sizes[:-1]):
        assert mask.dtype == torch.bfloat16
        exact = size.double().log().transpose(1, 2).unsqueeze(1)           # [B, 1, 1, N]
        assert torch.allclose(mask.double(), exact, rtol=2 ** -8, atol=0)  # one bf16 rounding
    for size in sizes:
        assert torch.equal(size, size.round()) and size.dtype == torch.float32
        assert (size.sum(dim=1) == 65).all()  # every input token counted once ([CLS] + 64 patches)


def test_tome_sizes_count_exactly_in_a_bf16_model():
    """A merged token can hold more than 256 input tokens, beyond bfloat16's exact integers: sizes
    are counted in float32 so that they still sum to the number of input tokens."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=128, patch_size=4, depth=9, num_classes=10)
    net = with_reducer(vit, ToMe(r=[512, 256, 128, 64, 32, 16, 8, 4, 2])).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 128, 128, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10)
    last = net.selections[-1].size
    assert last.shape == (2, 3, 1) and last.max() > 256
    assert (last.double().sum(dim=1) == 1025).all()


def test_diffrate_kept_numbers_are_float32_under_autocast():
    """A kept number rounded through bfloat16 (steps of 0.25 near 40) would ceil to another integer."""
    from accel.reducers.diffrate import kept_number
    candidates = torch.arange(64, 0, -4, dtype=torch.float32)
    logits = torch.randn(16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        autocast = kept_number(logits, candidates)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, kept_number(logits, candidates))
