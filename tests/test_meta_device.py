"""Device-agnostic forwards: every tensor a token-reducing network creates during a forward (index
tensors, masks, scores, token sizes) is on the input's device. The networks are built and run on
PyTorch's ``meta`` device (shapes only, no data): a tensor created without ``device=`` lands on the
CPU, which the recorder below reports even where an op would silently accept it."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from small_nets import IMG, NAMES, build, head_logits


class _OffDevice(TorchDispatchMode):
    """Records every op whose output tensors are not on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in leaves):
            self.ops.append(str(func))
        return out


def test_the_recorder_sees_a_tensor_created_on_the_cpu():
    with _OffDevice() as rec:
        torch.arange(4)
        torch.zeros(2, device="meta")
    assert rec.ops == ["aten.arange.default"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_creates_every_tensor_on_the_input_device(name, train):
    with torch.device("meta"):  # build only: the forward below runs without a default device
        net = build(name)
    net.train(train).set_tracing(True)  # ToMe also builds its merge sources
    x = torch.empty(2, 3, IMG, IMG, device="meta")
    with _OffDevice() as rec:
        out = net(x)
        if train:
            sum(o.sum() for o in head_logits(out)).backward()
    assert rec.ops == []
    assert all(o.device.type == "meta" for o in head_logits(out))
    assert net.selections and all(t.device.type == "meta" for s in net.selections
                                  for t in vars(s).values() if isinstance(t, torch.Tensor))
