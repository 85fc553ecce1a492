"""Top-K, K-Medoids, DPC-KNN and PatchMerger give the outputs of Haurum et al.'s model classes
(JoakimHaurum/TokenReduction, commit in PROVENANCE.md) on the same weights and images: eval logits, what
each location kept or how it clustered, and for the two learned ones the training logits and gradients.

The fixtures were written by tests/fixtures/reference/make_haurum.py (a 224 px, patch-16 DeiT of width 64
and depth 4, reduction before/at blocks 1 and 2, keep rate 0.7: 137 then 96 tokens)."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from accel.backbones import with_reducer
from accel.errors import UserInputError
from accel.reducers import DPCKNN, ClusteredTokens, KeptTokens, KMedoids, PatchMerger, TopK
from accel.visualize import render
from conftest import make_cfg
from pipeline import instantiate

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
MODEL = torch.load(FIXTURES / "haurum_model.pt")
CASES = torch.load(FIXTURES / "haurum_outputs.pt")
REDUCERS = {"topk": TopK, "kmedoids": KMedoids, "dpcknn": DPCKNN, "patchmerger": PatchMerger}
FORWARD_SEED = 1234       # make_haurum.py seeds the global RNG so before each forward (DPC-KNN's density noise)


def load(method):
    case = CASES[method]
    vit = VisionTransformer(**MODEL["config"])
    vit.load_state_dict(MODEL["state_dict"], strict=True)
    net = with_reducer(vit, REDUCERS[method](case["keep_rate"], case["locations"]))
    net.reducer.load_state_dict(case["params"], strict=True)   # their names: cluster_layers.<s>.*
    images = (MODEL["images"].float() / 255 - 0.5) / 0.25      # make_haurum.to_float
    return net, images, case


@pytest.mark.parametrize("method", sorted(REDUCERS))
def test_eval_equals_authors_code(method):
    net, images, case = load(method)
    torch.manual_seed(FORWARD_SEED)
    with torch.no_grad():
        logits = net.eval()(images)
    torch.testing.assert_close(logits, case["logits"], atol=1e-4, rtol=0)
    theirs, ours = case["selections"], net.selections
    assert [s.block for s in ours] == case["locations"]
    if method == "topk":   # their indices count the current tokens: compose to patch numbers
        patch = torch.arange(net.grid[0] * net.grid[1]).expand(images.shape[0], -1)
        for sel, idx in zip(ours, theirs["kept"]):
            patch = patch.gather(1, idx.long())
            assert isinstance(sel, KeptTokens) and torch.equal(sel.kept, patch)
        return
    for s, sel in enumerate(ours):
        assert isinstance(sel, ClusteredTokens)
        if method == "patchmerger":
            assert sel.centers is None and torch.equal(sel.token_cluster, theirs["assignment"][s].long())
        elif method == "kmedoids":
            assert torch.equal(sel.centers, theirs["centers"][s].long())
            assert torch.equal(sel.token_cluster, theirs["assignment"][s].long())
        else:
            # DPC-KNN orders its centres by δ·ρ, and at the second location two of them lie 3e-8 apart, below
            # the 1e-7 by which fused attention moves the tokens: compare the centre each token joins.
            centre = theirs["centers"][s].long().gather(1, theirs["assignment"][s].long())
            assert torch.equal(sel.centers.gather(1, sel.token_cluster), centre)
            assert torch.equal(sel.centers.sort(dim=1).values, theirs["centers"][s].long().sort(dim=1).values)


@pytest.mark.parametrize("method", ["dpcknn", "patchmerger"])
def test_training_logits_and_gradients_equal_authors_code(method):
    net, images, case = load(method)
    torch.manual_seed(FORWARD_SEED)
    logits = net.train()(images).main
    F.cross_entropy(logits, MODEL["labels"]).backward()
    torch.testing.assert_close(logits.detach(), case["train_logits"], atol=1e-4, rtol=0)
    params = dict(net.named_parameters())
    ours = [n.split(".", 1)[1] for n in params if n.startswith("reducer.")]
    assert sorted(case["grads"]) == sorted(ours + ["cls_token", "patch_embed.proj.weight"])
    for name, grad in case["grads"].items():
        ours = params[("reducer." if name.startswith("cluster_layers") else "vit.") + name].grad
        torch.testing.assert_close(ours, grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", sorted(REDUCERS))
def test_keep_rate_one_is_timm(method):
    net, images, _ = load(method)
    net = with_reducer(net.vit, REDUCERS[method](1.0, (1, 2))).eval()
    with torch.no_grad():
        assert torch.equal(net(images[:1]), net.vit(images[:1]))
    assert net.selections == []


@pytest.mark.parametrize("method", sorted(REDUCERS))
def test_configs_compose_and_train_on_digits(tmp_path, method):
    cfg = make_cfg(tmp_path, [f"model={method}_deit_s"])
    assert cfg.model.name == "deit_small_patch16_224" and cfg.reducer._target_.endswith("." + REDUCERS[method].__name__)
    assert cfg.keep_rate == 0.7 and list(cfg.reducer.locations) == [3, 6, 9]
    cfg = make_cfg(tmp_path, [f"reducer={method}", "reducer.locations=[1,3]", "keep_rate=0.5"])
    net = instantiate(cfg.module).net.train()
    counts = []
    for blk in net.vit.blocks:
        blk.norm2.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
    net(torch.randn(2, 3, 32, 32)).main.sum().backward()
    assert counts == [17, 1 + 8, 9, 1 + 4, 5, 5]          # 16 patches: int(16·.5) = 8, int(16·.25) = 4
    assert [s.block for s in net.selections] == [1, 3]
    own = {k for k in net.state_dict() if k.startswith("reducer.")}
    assert set(net.state_dict()) - own == set(net.vit.state_dict())     # the backbone under timm's names
    learned = {"dpcknn": {"score.weight", "score.bias"}, "patchmerger": {"queries", "norm.weight", "norm.bias"}}
    assert own == {f"reducer.cluster_layers.{s}.{n}" for s in (0, 1) for n in learned.get(method, ())}
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("reducer."))


def test_patchmerger_keep_rate_is_fixed_and_kmedoids_needs_a_previous_block():
    vit = VisionTransformer(**MODEL["config"])
    net = with_reducer(vit, PatchMerger(0.7, (1, 2)))
    net.set_keep_rate(0.7)
    with pytest.raises(UserInputError, match=r"PatchMerger learns one query per output token \(\[137, 96\].*keep_rate=0.5"):
        net.set_keep_rate(0.5)
    with pytest.raises(UserInputError, match=r"K-Medoids locations=\[0, 2\]: block 0 has no previous block"):
        with_reducer(vit, KMedoids(0.7, (0, 2)))


def test_selection_picture_colours_each_patch_by_its_cluster():
    """DPC-KNN puts every centre in its own cluster, so all int(64·.5) = 32, then 16 clusters hold patches;
    a patch's cluster at the second location is the cluster of the token that held it after the first."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=5)
    net = with_reducer(vit, DPCKNN(0.5, (1, 2)))
    fig = render(net, torch.randn(2, 3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1:3] == titles[4:6] == ["block 1: 32/64 clusters", "block 2: 16/64 clusters"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["colours: patches in one cluster (one token) share a colour"]
    first, second = net.selections
    assert torch.equal(first.assignment, first.token_cluster)          # the first location clusters the patches
    assert torch.equal(second.assignment, second.token_cluster.gather(1, first.assignment))


@pytest.mark.parametrize("case", range(3))
def test_clustering_equals_authors_code_on_tied_tokens(case):
    """Half the tokens copy the other half and the weights are small integers: tied distances, tied weights,
    duplicate medoids whose empty clusters fall back to token 0, as in their k_medoids_fit and cluster_dpc_knn."""
    from accel.reducers.dpcknn import dpc_knn
    from accel.reducers.kmedoids import k_medoids
    c = CASES["clustering_cases"][case]
    medoids, medoid_cluster = k_medoids(c["x"], c["weight"], c["K"], iters=3)
    assert torch.equal(medoids, c["medoids"]) and torch.equal(medoid_cluster, c["medoid_cluster"])
    torch.manual_seed(FORWARD_SEED)
    centers, token_cluster = dpc_knn(c["x"], c["K"], k=5)
    assert torch.equal(centers, c["centers"]) and torch.equal(token_cluster, c["token_cluster"])


def test_dpcknn_equal_weight_averages_each_cluster_without_parameters():
    net, images, _ = load("topk")                     # the fixture backbone alone
    net = with_reducer(net.vit, DPCKNN(0.7, (1, 2), equal_weight=True)).eval()
    assert not [n for n, _ in net.named_parameters() if n.startswith("reducer.")]
    seen = []
    net.vit.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    net.vit.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        net(images)
    before, after = seen[0][0, 1:], seen[1][0, 1:]       # image 0's tokens into and out of the clustering
    cluster = net.selections[0].token_cluster[0]
    mean = torch.stack([before[cluster == k].mean(dim=0) for k in range(after.shape[0])])
    torch.testing.assert_close(after, mean, atol=1e-5, rtol=1e-5)
