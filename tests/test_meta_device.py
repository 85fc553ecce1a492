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


# Forwards whose shapes are values the host must read back, which meta tensors do not have (each read-back
# is counted in test_host_sync.py): ATS padded to the batch's widest image (``ats_static`` runs the same
# code with its width from the shapes, and is checked here), and DiffRate's search at eval (kept numbers
# from θ; its training forward, masks over every token, is checked).
DATA_DEPENDENT_SHAPES = {("ats", False), ("ats", True), ("diffrate_search", False)}
# Training forwards that mask tokens instead of removing them record no selection.
MASKED_IN_TRAINING = {"dynamicvit", "diffrate_search"}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", [n for n in NAMES if {(n, False), (n, True)} - DATA_DEPENDENT_SHAPES])
def test_forward_creates_every_tensor_on_the_input_device(name, train):
    if (name, train) in DATA_DEPENDENT_SHAPES:
        pytest.skip(f"{name} {'train' if train else 'eval'}: its shapes are data (DATA_DEPENDENT_SHAPES)")
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
    assert bool(net.selections) != (train and name in MASKED_IN_TRAINING)
    assert all(t.device.type == "meta" for s in net.selections for t in vars(s).values() if isinstance(t, torch.Tensor))
