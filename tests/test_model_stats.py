"""The run's logged cost is the cost of the network it scores: callbacks.model_stats logs the GMACs
when training starts and again when testing starts, after the tested checkpoint is loaded."""
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.model_stats import ModelStats


class Capture:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


class KeepsSomeInputs(pl.LightningModule):
    """A linear head over the first ``keep`` inputs: its cost changes as a searched schedule's does."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(10, 48))
        self.keep = 48

    @property
    def num_parameters(self) -> int:
        return self.weight.numel()

    def forward(self, x):
        return F.linear(x.flatten(1)[:, :self.keep], self.weight[:, :self.keep])


def test_gmacs_are_logged_again_for_the_tested_network():
    logger, module, callback = Capture(), KeepsSomeInputs(), ModelStats()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(image_size=4), loggers=[logger], global_step=30)
    callback.on_fit_start(trainer, module)
    module.keep = 12                       # what training settled on
    callback.on_test_start(trainer, module)
    (start, at_fit), (end, at_test) = logger.logged
    assert (start, end) == (0, 30)
    assert at_fit["model/gmacs"] == 10 * 48 / 1e9 and at_test["model/gmacs"] == 10 * 12 / 1e9
    assert at_fit["model/params_M"] == at_test["model/params_M"] == 480 / 1e6
