"""The surface every token-reducing network offers (accel.reducers.protocol.TokenReducingNet):
keep rate, selection mode, typed selections, timm's forward_features/forward_head split, and
gradient checkpointing through the ViT wrapper."""
import copy

import pytest
import timm
import torch

from accel.backbones import create_evo_levit, with_reducer
from accel.errors import UserInputError
from accel.heads import Heads
from accel.reducers import EViT, EvoViT, ToMe, TokenReducer
from accel.reducers.protocol import TokenReducingNet
from accel.reducers.selection import KeptTokens, MergedTokens, SlowFastTokens

REDUCERS = {"evit": lambda: EViT(0.5, locations=(1, 3)), "evo": lambda: EvoViT(0.5, start=2, stages=(2, 4)),
            "evo_rep": lambda: EvoViT(0.5, start=2, stages=(2, 4), fast_path="representative"),
            "tome": lambda: ToMe(r=6, trace_source=True)}


def small_vit(drop_path_rate=0.0, depth=6):
    """DeiT-T blocks on 64 px images with 8 px patches (64 image tokens)."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=depth,
                             drop_path_rate=drop_path_rate)


def evo_levit():
    return create_evo_levit("evo_levit_128s", [1, 1] + [0.5] * 7, [0.5] * 3, num_classes=5, img_size=64)


IMAGES = torch.randn(2, 3, 64, 64)


def test_every_token_reducing_net_offers_the_protocol_and_a_plain_vit_does_not():
    assert not isinstance(small_vit(), TokenReducingNet)
    nets = [with_reducer(small_vit(), make()) for make in REDUCERS.values()] + [evo_levit()]
    assert all(isinstance(net, TokenReducingNet) for net in nets)


@pytest.mark.parametrize("name", ["evit", "tome"])
def test_a_reducer_without_selection_mode_says_so_and_refuses_one(name):
    net = with_reducer(small_vit(), REDUCERS[name]())
    assert net.layerwise is None
    with pytest.raises(UserInputError, match=r"has no layer-wise/stage-wise selection mode; expected Evo-ViT"):
        net.set_layerwise(False)


@pytest.mark.parametrize("make", [lambda: with_reducer(small_vit(), EvoViT(0.5, start=2, stages=(2, 4))), evo_levit],
                         ids=["evo_vit", "evo_levit"])
def test_evo_selection_mode_decides_how_often_tokens_are_selected(make):
    net = make().train()
    net.set_layerwise(True)
    net(IMAGES)
    layerwise = len(net.selections)
    net.set_layerwise(False)
    assert net.layerwise is False
    net(IMAGES)
    assert len(net.selections) < layerwise                     # once per stage instead of once per layer
    assert all(isinstance(s, SlowFastTokens) for s in net.selections)


@pytest.mark.parametrize("name, kind, blocks", [("evit", KeptTokens, [1, 3]), ("evo", SlowFastTokens, [2, 4]),
                                                ("tome", MergedTokens, [0, 1, 2, 3, 4, 5])])
def test_selections_are_typed_per_block(name, kind, blocks):
    net = with_reducer(small_vit(), REDUCERS[name]()).eval()
    with torch.no_grad():
        net(IMAGES)
    assert [type(s) for s in net.selections] == [kind] * len(blocks)
    assert [s.block for s in net.selections] == blocks and all(s.grid == (8, 8) for s in net.selections)
    if kind is MergedTokens:
        assert net.selections[-1].size.shape == (2, 65 - 6 * 6, 1) and net.selections[-1].num_prefix == 1
    else:
        assert net.selections[0].kept.shape == (2, 32)


def test_evo_levit_selections_index_the_stage_grid():
    net = evo_levit().eval()
    with torch.no_grad():
        net(IMAGES)
    # Depths 2, 3, 4 on grids 4×4, 2×2, 1×1 (64 px); the first stage prunes nothing, the others select
    # once (stage-wise), at their first layer.
    assert [(s.block, s.grid) for s in net.selections] == [(2, (2, 2)), (5, (1, 1))]
    for s in net.selections:
        assert s.source_index.shape[1] == s.grid[0] * s.grid[1] and int(s.source_index.max()) < s.source_index.shape[1]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_forward_is_forward_head_of_forward_features(name, training):
    net = with_reducer(small_vit(), REDUCERS[name]()).train(training)
    with torch.no_grad():
        feats = net.forward_features(IMAGES)
        split = net.forward_head(feats)
        whole = net(IMAGES)
        pooled = net.forward_head(net.forward_features(IMAGES), pre_logits=True)
    assert isinstance(feats, torch.Tensor) and feats.shape[0] == 2 and feats.shape[-1] == 192
    # Training mode: Heads (Evo-ViT's auxiliary [CLS] head beside the class head); eval mode: logits.
    assert isinstance(whole, Heads) == training
    for a, b in zip(*(o.tensors() if training else [o] for o in (split, whole))):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if training:
        assert (whole.aux_cls is not None) == name.startswith("evo") and whole.dist is None
    assert pooled.shape == (2, 192)


def test_identity_reducer_features_equal_timm_features():
    vit = small_vit().eval()
    with torch.no_grad():
        torch.testing.assert_close(with_reducer(vit, TokenReducer()).forward_features(IMAGES),
                                   vit.forward_features(IMAGES), atol=0, rtol=0)


def saved_bytes_and_grads(net, checkpointing):
    """Bytes of the distinct storages autograd saves for the backward pass, and the gradients."""
    net.set_grad_checkpointing(checkpointing)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(5)                      # the same drop-path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        heads = net(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
        loss = sum(h.logsumexp(-1).mean() for h in heads.tensors())
        loss.backward()
    return sum(storages.values()), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_grad_checkpointing_gives_the_same_gradients_and_saves_memory(name):
    plain = with_reducer(small_vit(drop_path_rate=0.1), REDUCERS[name]()).train()
    ckpt = copy.deepcopy(plain)
    plain_bytes, plain_grads = saved_bytes_and_grads(plain, False)
    ckpt_bytes, ckpt_grads = saved_bytes_and_grads(ckpt, True)
    assert ckpt_grads.keys() == plain_grads.keys() and len(plain_grads) > 50
    for n, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[n], g, atol=1e-6, rtol=1e-5, msg=n)
    # Each block is re-run in the backward pass, but its selection is recorded once.
    assert [(type(s), s.block) for s in ckpt.selections] == [(type(s), s.block) for s in plain.selections]
    assert ckpt_bytes < 0.25 * plain_bytes, (ckpt_bytes, plain_bytes)
