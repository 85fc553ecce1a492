"""A learned reducer's own loss terms (``TokenReducer.training_losses``) reach the training objective
through ``Heads.losses``: the module adds them, logs them by name, and their gradients train the
reducer's parameters (which live under ``reducer.`` in the state dict)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accel.backbones import with_reducer
from accel.heads import Heads
from accel.reducers.base import TokenReducer
from module import ImageClassifier
from tests.small_nets import images, small_vit


class TargetedScale(TokenReducer):
    """A toy learned reducer: one parameter, pulled toward 0.25 by its own loss term only."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def reset(self, x, num_prefix):
        state = super().reset(x, num_prefix)
        state["scale"] = self.scale
        return state

    def training_losses(self, state):
        return {"target": 3.0 * (state["scale"] - 0.25) ** 2}


def test_training_forward_carries_the_reducers_terms_and_eval_forward_does_not():
    net = with_reducer(small_vit(num_classes=10), TargetedScale())
    out = net.train()(images())
    assert isinstance(out, Heads) and set(out.losses) == {"target"}
    torch.testing.assert_close(out.losses["target"], torch.tensor(3.0 * 0.75 ** 2))
    assert isinstance(net.eval()(images()), torch.Tensor)
    assert "reducer.scale" in net.state_dict()


def test_heads_refuse_a_loss_term_named_twice():
    heads = Heads(torch.zeros(1, 2)).with_losses({"ratio": torch.tensor(1.0)})
    try:
        heads.with_losses({"ratio": torch.tensor(2.0)})
    except ValueError as e:
        assert "ratio" in str(e)
    else:
        raise AssertionError("a second 'ratio' term was accepted")


def test_module_adds_logs_and_trains_the_reducers_terms(tmp_path):
    net = with_reducer(small_vit(num_classes=10), TargetedScale())
    module = ImageClassifier(net, num_classes=10, batch_size=4, lr=0.0, smoothing=0.0, warmup_epochs=0)
    # Only the reducer's parameter learns (lr 0 elsewhere): its update must come from its own term.
    module.configure_optimizers = lambda: torch.optim.SGD(
        [{"params": [net.reducer.scale], "lr": 0.1},
         {"params": [p for n, p in net.named_parameters() if not n.startswith("reducer.")], "lr": 0.0}])
    data = TensorDataset(images(batch=4), torch.arange(4) % 10)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4))
    # d/ds 3(s - 0.25)^2 at s=1 is 4.5; one SGD step of 0.1 gives 1 - 0.45.
    torch.testing.assert_close(net.reducer.scale.detach(), torch.tensor(0.55))
    logged = trainer.logged_metrics
    torch.testing.assert_close(logged["train/loss_target_step"], torch.tensor(3.0 * 0.75 ** 2))
