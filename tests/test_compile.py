"""torch.compile of the token-reducing networks on the CPU: one graph per forward (no graph breaks)
in eval and training mode, inductor logits equal to eager within 1e-4 on DeiT-T-wide models, and a
keep-rate change that recompiles rather than reusing a graph traced for the old keep rate.

Token counts are Python ints computed from shapes and the keep rate (never from tensor values), so
dynamo traces each forward as a single static graph; the keep rate is guarded on, so changing it
(a keep-rate schedule) costs one recompilation per distinct value.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from small_nets import NAMES, build, head_logits, images


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Forwards whose shapes are values read back to the host, so dynamo must break the graph there:
# ATS padded to the batch's widest image (one read-back per sampling block; ``ats_static`` pads to the K
# samples and is one graph), and DiffRate's search at eval, whose kept numbers come from θ: it reads them
# outside the graph (``DiffRate._searched_schedule``, cached per θ version), the only break checked below.
DATA_DEPENDENT_SHAPES = {("ats", False): None, ("ats", True): None, ("diffrate_search", False): "_searched_schedule"}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_is_one_graph(name, train):
    breaks_at = DATA_DEPENDENT_SHAPES.get((name, train), "")
    if breaks_at is None:
        pytest.skip(f"{name}: its padded width is data (DATA_DEPENDENT_SHAPES)")
    net = build(name).train(train)
    explained = torch._dynamo.explain(net)(images(2))
    if breaks_at:
        assert explained.break_reasons and all(breaks_at in b.reason for b in explained.break_reasons)
        return
    assert [b.reason for b in explained.break_reasons] == []
    assert explained.graph_count == 1


def test_diffrate_search_eval_compiled_follows_theta():
    """The schedule read outside the graph is the current θ's: an update changes the compiled forward's token
    counts (a new graph), and an unchanged θ reuses the graph it has."""
    net = build("diffrate_search").eval()
    compiled = torch.compile(net, backend="eager", dynamic=False)
    x = images(2)
    stats = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        compiled(x)
        graphs = stats["unique_graphs"]
        compiled(x)
        assert stats["unique_graphs"] == graphs
        for theta in net.reducer.prune_logits:
            theta[0] += 3.0   # towards the largest candidate: keep more tokens after pruning
        out = compiled(x)
        assert net.reducer.export()[0] == [65] + [57] * 5
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)


# Every network under inductor; each compiles for 8-33 s on 2 CPU cores, so beyond one per core
# method the comparison is opt-in (``pytest -m slow``).
INDUCTOR_IN_SUITE = ("evit", "evo", "tome")


@pytest.mark.parametrize("name", [n if n in INDUCTOR_IN_SUITE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_inductor_inference_equals_eager(name):
    net = build(name).eval()
    x = images(2)
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net, backend="inductor", dynamic=False)(x)
    assert compiled.shape == eager.shape == (2, 10)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["evit", "evo", "tome_keep_rate"])
def test_compiled_training_step_gradients_equal_eager(name):
    """The autograd graph dynamo/AOTAutograd build (backend aot_eager: no C++ compilation) gives
    eager's gradients."""
    net = build(name).train()
    x, y = images(4), torch.arange(4) % 10
    grads = []
    for model in (net, torch.compile(net, backend="aot_eager", dynamic=False)):
        net.zero_grad()
        outs = head_logits(model(x))
        (sum(torch.nn.functional.cross_entropy(o, y) for o in outs) / len(outs)).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["evit", "tome_keep_rate"])
def test_keep_rate_change_recompiles(name):
    net = build(name).eval()
    compiled = torch.compile(net, backend="eager", dynamic=False)
    x = images(2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled(x)
        net.set_keep_rate(0.75)
        after = compiled(x)
        assert torch.equal(after, net(x))  # the graph for the new keep rate, not the old one
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


def test_module_compile_compiles_the_network_in_training_and_a_new_keep_rate_compiles_again(tmp_path, monkeypatch):
    """module.compile=true: the network runs compiled in the training step (nn.Module.compile in place,
    state-dict keys unchanged). The backend is swapped for aot_eager (dynamo and AOTAutograd as with
    inductor, without its C++ build)."""
    from conftest import FAST, make_cfg
    from pipeline import build as build_run

    compiled_with = []
    compile_ = torch.compile

    def aot_eager(fn, *args, **kwargs):
        compiled_with.append(kwargs)
        return compile_(fn, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    cfg = make_cfg(tmp_path, ["model=evit_deit_t", "reducer.locations=[0]", "data=synthetic", "data.image_size=32",
                              "data.num_classes=5", "data.batch_size=4", "data.train_samples=8", "trainer=cpu",
                              "trainer.max_steps=2", "trainer.limit_val_batches=0", "logger=csv",
                              "module.compile=true", *FAST])
    datamodule, module, trainer = build_run(cfg)
    assert len(compiled_with) == 1
    assert all(k.startswith("net.") and "_orig_mod" not in k for k in module.state_dict())
    stats = torch._dynamo.utils.counters["stats"]
    start = stats["unique_graphs"]  # counters outlive torch._dynamo.reset(): count from here
    trainer.fit(module, datamodule)
    assert trainer.global_step == 2
    assert stats["unique_graphs"] - start == 1, "the training forward is one compiled graph"
    x = torch.randn(4, 3, 32, 32)
    module.train()
    # In training dynamo guards on the keep rate's value: each new keep rate compiles one more graph
    # (up to torch._dynamo.config.recompile_limit, README "GPU"); a keep rate seen before reuses its graph.
    for keep_rate, graphs in ((0.7, 1), (0.5, 2), (0.5, 2), (0.7, 2), (0.6, 3)):
        module.set_keep_rate(keep_rate)
        module(x)
        assert stats["unique_graphs"] - start == graphs, keep_rate
    module.eval().set_keep_rate(0.55)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.net.forward(x), rtol=0, atol=1e-5)  # compiled vs eager
