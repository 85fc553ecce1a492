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


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_is_one_graph(name, train):
    net = build(name).train(train)
    explained = torch._dynamo.explain(net)(images(2))
    assert [b.reason for b in explained.break_reasons] == []
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["evit", "evo", "tome"])
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
