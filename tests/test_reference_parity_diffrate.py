"""DiffRate equals OpenGVLab/DiffRate's code (fixtures from tests/fixtures/reference/make_diffrate.py):
eval logits, token sizes and merge sources under fixed schedules; the search forward's logits, kept
numbers, masks, sizes, differentiable FLOPs and FLOPs loss, and the gradients of θ; plus export, the
keep-rate rules and a config that composes and trains."""
from __future__ import annotations

import os

import hydra
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from accel.backbones import with_reducer
from accel.errors import UserInputError
from accel.heads import Heads
from accel.reducers.diffrate import DiffRate, schedule_from_state_dict
from accel.reducers.selection import PrunedMergedTokens
from conftest import make_cfg

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "reference")
MODEL = torch.load(os.path.join(HERE, "diffrate_model.pt"))
OUT = torch.load(os.path.join(HERE, "diffrate_outputs.pt"))


def vit() -> VisionTransformer:
    model = VisionTransformer(**MODEL["config"])
    model.load_state_dict(MODEL["state_dict"], strict=True)
    return model


def searching(case: str, **kw):
    reducer = DiffRate(search=True, granularity=MODEL["granularity"], **kw)
    net = with_reducer(vit(), reducer)
    with torch.no_grad():
        for name in ("prune", "merge"):
            for p, value in zip(getattr(reducer, f"{name}_logits"), MODEL["theta"][case][name]):
                p.copy_(value)
    return net, reducer


def recording(reducer):
    """The state after each block of the reducer's next forwards."""
    states, block = [], reducer.block

    def run(i, blk, x, state):
        x, state = block(i, blk, x, state)
        states.append(dict(state))   # a block rebinds the keys of one dict
        return x, state
    reducer.block = run
    return states


@pytest.mark.parametrize("case", sorted(OUT["eval"]))
def test_eval_logits_sizes_and_sources_equal_the_authors(case):
    ref = OUT["eval"][case]
    net = with_reducer(vit(), DiffRate(ref["prune"], ref["merge"], trace_source=True)).eval()
    with torch.no_grad():
        logits = net(MODEL["images"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    # Every block after the first compresses in these schedules: sizes and sources in the authors' order.
    assert [s.block for s in net.selections] == [1, 2, 3]
    for s in net.selections:
        assert isinstance(s, PrunedMergedTokens)
        torch.testing.assert_close(s.size[..., 0], ref["size"][s.block], atol=1e-4, rtol=0)
        assert torch.equal(s.source > 0, ref["source"][s.block])
    torch.testing.assert_close(net.reducer.gflops(), float(ref["flops"]) / 1e9, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", sorted(OUT["search"]))
def test_search_forward_flops_loss_and_theta_gradients_equal_the_authors(case):
    ref = OUT["search"][case]
    net, reducer = searching(case, target_flops=ref["target"], loss_weight=OUT["lambda"])
    states = recording(reducer)
    out = net.train()(MODEL["images"])
    assert isinstance(out, Heads) and set(out.losses) == {"flops"}
    torch.testing.assert_close(out.main, ref["logits"], atol=1e-4, rtol=0)
    kept = states[-1]["kept"]
    assert torch.equal(torch.stack([p for p, _ in kept]).detach(), ref["prune_kept"])
    assert torch.equal(torch.stack([m for _, m in kept]).detach(), ref["merge_kept"])
    for state, mask, size in zip(states, ref["mask"], ref["size"]):
        torch.testing.assert_close(state["mask"].detach(), mask, atol=1e-6, rtol=0)
        torch.testing.assert_close(state["size"][..., 0].detach(), size, atol=1e-4, rtol=0)
    gflops = reducer.search_gflops(states[-1])
    torch.testing.assert_close(gflops.detach(), ref["flops"] / 1e9, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.losses["flops"].detach(), ref["flops_loss"], rtol=1e-5, atol=1e-9)
    ce = F.cross_entropy(out.main, MODEL["labels"])
    for term, grads in ((ce, ref["grad_ce"]), (gflops, ref["grad_gflops"]), (ce + out.losses["flops"], ref["grad_loss"])):
        reducer.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        for name in ("prune", "merge"):
            got = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p)
                               for p in getattr(reducer, f"{name}_logits")])
            torch.testing.assert_close(got, grads[name], rtol=1e-4, atol=1e-8)


def test_search_exports_the_schedule_its_eval_forward_uses():
    net, reducer = searching("decreasing")
    prune, merge = reducer.export()
    ref = OUT["search"]["decreasing"]
    assert prune == [int(v) for v in ref["prune_kept"]] and merge == [int(v) for v in ref["merge_kept"]]
    fixed = with_reducer(vit(), DiffRate(prune, merge)).eval()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(MODEL["images"]), fixed(MODEL["images"]), atol=0, rtol=0)
    # What scripts/diffrate_schedule.py reads from a checkpoint: the same schedule and its GFLOPs.
    assert schedule_from_state_dict(net.state_dict()) == (prune, merge, pytest.approx(reducer.gflops(), rel=1e-6))


def test_keep_rate_is_the_search_target_and_refused_with_a_fixed_schedule():
    prune, merge = OUT["eval"]["prune_merge"]["prune"], OUT["eval"]["prune_merge"]["merge"]
    with pytest.raises(UserInputError, match="keep_rate=0.7"):
        DiffRate(prune, merge, keep_rate=0.7)
    with pytest.raises(UserInputError, match="target_flops=2.9 and keep_rate=0.5"):
        DiffRate(search=True, target_flops=2.9, keep_rate=0.5)
    with pytest.raises(UserInputError, match="prune="):
        DiffRate(prune, merge, search=True)
    with pytest.raises(UserInputError, match="4 kept numbers"):
        with_reducer(vit(), DiffRate(prune[:3], merge[:3]))
    with pytest.raises(UserInputError, match=r"schedule=2.3 and prune/merge lists .*reducer.schedule=null"):
        DiffRate(prune, merge, schedule=2.3)
    with pytest.raises(UserInputError, match=r"schedule=2.3 on a ViT of embed_dim .* DeiT-S \(embed_dim 384\): 2.3, 2.5"):
        with_reducer(vit(), DiffRate(schedule=2.3))
    net, reducer = searching("decreasing", keep_rate=0.6)
    full = [197] * 4
    assert reducer.target_gflops == pytest.approx(0.6 * reducer.gflops((full, full)))
    net.set_keep_rate(0.5)   # a keep-rate schedule moves the target
    assert reducer.target_gflops == pytest.approx(0.5 * reducer.gflops((full, full)))


def test_digits_experiment_composes_and_a_search_step_trains_the_logits(tmp_path):
    cfg = make_cfg(tmp_path, ["experiment=diffrate_digits", "data=synthetic", "data.image_size=32",
                              "data.num_classes=10", "data.batch_size=4"])
    module = hydra.utils.instantiate(cfg.module)
    reducer = module.net.reducer
    assert reducer.search and len(reducer.prune_logits) == 5 and reducer.candidates.tolist() == list(range(16, 0, -1))
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    heads = Heads.of(module.train()(images))
    loss = F.cross_entropy(heads.main, labels) + sum(heads.losses.values())
    loss.backward()
    assert heads.losses["flops"] > 0 and reducer.prune_logits[0].grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        assert module(images).shape == (4, 10)
    prune, merge = reducer.export()
    assert len(prune) == len(merge) == 6 and prune[0] == merge[0] == 17


def test_picture_dims_the_pruned_patches_and_colours_the_merged_ones():
    from accel.visualize import legend_entries, panels, selection_figure, to_array
    ref = OUT["eval"]["prune_merge"]
    net = with_reducer(vit(), DiffRate(ref["prune"], ref["merge"], trace_source=True)).eval()
    with torch.no_grad():
        net(MODEL["images"])
    block1 = net.selections[0]
    held = (block1.source[0, :, 1:] > 0).any(dim=0).reshape(14, 14)   # block 1 keeps 149 of 196 patches' tokens
    assert 0 < int((~held).sum()) < 196
    white = torch.ones(1, 112, 112, 3).numpy()
    picture = panels(white, [block1])[0][1].image.reshape(14, 8, 14, 8, 3).transpose(0, 2, 1, 3, 4)   # per patch
    assert picture[~held.numpy()].max() <= 0.2 + 1e-6 and picture[held.numpy()].min() >= 0.575 - 1e-6
    assert [entry[1] for entry in legend_entries([block1])] == [
        "colours: patches merged into one token share a colour", "dimmed: patches pruned at this block or before"]
    assert to_array(selection_figure(white, net.selections)).std() > 0   # the figure with its legend draws
