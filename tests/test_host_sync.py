"""No host synchronisation in a training step of any token-reducing network.

On a GPU a value read back to the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``) or an op whose output shape depends on tensor values (``nonzero``, boolean-mask
indexing, ``unique``) stalls the CPU until the GPU has caught up, which starves the launch queue.
On the CPU these calls are found by recording them: the ops through a dispatch mode (every scalar
read-back is ``aten._local_scalar_dense``), the Python-side copies by wrapping the Tensor methods.
On CUDA, ``test_cuda.py`` runs the same step under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator, List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from small_nets import NAMES, build, images, loss_of

aten = torch.ops.aten
# Ops that read a value back (scalar read-back, equality as a Python bool) or whose output size
# depends on the data, so that the host must wait for it.
SYNC_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
            aten.repeat_interleave.Tensor, aten.bincount.default}
# .item() is seen as aten._local_scalar_dense. new_tensor copies host data to the tensor's device, on a
# GPU a synchronous copy (set_sync_debug_mode reports it), and dispatches no op a mode could see.
COPIES = ("cpu", "numpy", "tolist", "new_tensor")


def _where() -> str:
    """The innermost frame outside torch, timm and this recorder that made the call."""
    frames = [f for f in traceback.extract_stack() if "site-packages" not in f.filename and f.filename != __file__]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class _SyncRecorder(TorchDispatchMode):
    def __init__(self, events: List[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.events.append(f"{func} at {_where()}")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.events.append(f"boolean-mask indexing at {_where()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_syncs() -> Iterator[List[str]]:
    """Collect, as 'what at file:line', every host synchronisation made inside the block."""
    events: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in COPIES}

    def wrap(name, original):
        def recorded(self, *args, **kwargs):
            events.append(f"Tensor.{name}() at {_where()}")
            return original(self, *args, **kwargs)
        return recorded

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with _SyncRecorder(events):
            yield events
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_recorder_sees_each_kind_of_sync():
    x = torch.randn(4, 3)
    with record_syncs() as events:
        x.sum().item()
        bool(x.max() > 0)
        int(x.argmax())
        x.tolist()
        x[x > 0]
        x.nonzero()
        x.new_tensor(1.0)
    assert len(events) == 7, events


def train_step(net, x, y) -> None:
    loss_of(net(x), y).backward()


# Host reads that are the method's own, per forward, as (what, file, how many); every other network makes
# none, and these networks make no other. ATS (by default) pads a batch to its widest image, whose number
# of tokens the host needs for the shape: one read-back per sampling block (4 here). ``ats_static`` pads
# to the K samples instead and reads nothing back.
METHOD_SYNCS = {"ats": ("Tensor.tolist()", "accel/reducers/ats.py", 4)}


def unexplained(name: str, events: List[str]) -> List[str]:
    """``events`` less the method's own read-backs, whose number is checked."""
    what, where, count = METHOD_SYNCS.get(name, ("", "", 0))
    own = [e for e in events if count and e.startswith(what) and where in e]
    assert len(own) == count, events
    return [e for e in events if e not in own]


@pytest.mark.parametrize("name", NAMES)
def test_training_step_has_no_host_sync(name):
    net = build(name).train()
    x, y = images(4), torch.arange(4) % 10
    train_step(net, x, y)  # first step outside: lazy initialisation is not a per-step cost
    with record_syncs() as events:
        train_step(net, x, y)
    assert unexplained(name, events) == []


@pytest.mark.parametrize("name", ["evo", "evo_levit"])
def test_stage_wise_training_step_has_no_host_sync(name):
    net = build(name).train()
    net.set_layerwise(False)  # Evo-ViT's later epochs: selection once per stage
    with record_syncs() as events:
        train_step(net, images(4), torch.arange(4) % 10)
    assert events == []


# DiffRate's search at eval removes the tokens its θ says: the kept numbers are values of θ that the
# host needs for the shapes. They are read back once per θ update (one .tolist() of the whole schedule;
# test_diffrate_search_reads_its_schedule_back_once_per_update), so these networks warm up first.
READ_BACK_PER_UPDATE = {"diffrate_search"}


@pytest.mark.parametrize("name", NAMES)
def test_inference_has_no_host_sync(name):
    net = build(name).eval()
    with torch.no_grad():
        if name in READ_BACK_PER_UPDATE:
            net(images(2))
        with record_syncs() as events:
            net(images(2))
    assert unexplained(name, events) == []


def test_diffrate_search_reads_its_schedule_back_once_per_update():
    net = build("diffrate_search")
    x, y = images(4), torch.arange(4) % 10
    optimizer = torch.optim.SGD(net.reducer.parameters(), lr=1.0)
    reads, schedules = [], []
    for _ in range(2):
        with torch.no_grad(), record_syncs() as events:
            net.eval()(x)
            net(x)
        reads.append(events)
        schedules.append(net.reducer.export())
        train_step(net.train(), x, y)
        optimizer.step()   # θ moves: the next eval forward reads the new schedule
        optimizer.zero_grad()
    assert [len(r) for r in reads] == [1, 1] and all("diffrate.py" in r[0] for r in reads), reads
    assert schedules[0] != schedules[1]   # (lr 1 moves θ enough to change a kept number)


def classifier(ema_decay=None):
    from module import ImageClassifier
    from small_nets import small_vit
    from accel.reducers import EViT
    return ImageClassifier(small_vit(num_classes=10), EViT(0.5, locations=(1, 3)), num_classes=10,
                           ema_decay=ema_decay, mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0)).train()


def test_ema_update_has_no_host_sync():
    module = classifier(ema_decay=0.99)
    with record_syncs() as events:
        module.ema.update(module.net, step=1)
    assert events == []


def test_classifier_training_step_has_no_host_sync():
    module = classifier()
    x, y = images(4), torch.arange(4) % 10
    with record_syncs() as events:
        module.training_step((x, y), 1).backward()
    assert events == []


def test_loss_finiteness_is_checked_on_logging_steps_only():
    from types import SimpleNamespace
    module = classifier()
    logs = []
    for step in (0, 1, 49, 50):
        module._trainer = SimpleNamespace(log_every_n_steps=50, global_step=step)
        logs.append(module._logs_this_step())
    module._trainer = None
    assert logs == [True, False, False, True]


def test_nan_loss_on_a_logging_step_stops_with_one_sentence(monkeypatch):
    module = classifier()
    monkeypatch.setattr(module, "_logs_this_step", lambda: True)
    x, y = images(4), torch.arange(4) % 10
    x[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"Loss is nan at step 0; lower the learning rate"):
        module.training_step((x, y), 0)
