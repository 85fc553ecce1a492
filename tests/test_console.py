"""What a run prints (README "Using it"): the config in a few lines with the full tree in a file, the model
summary with its FLOPs counted, and a progress bar of one 80-column line with loss, val top-1, keep
rate and img/s."""
import io
import re
import sys
from types import SimpleNamespace

import pytest
import rich
import torch
from pytorch_lightning.utilities.model_summary.model_summary import get_human_readable_count

from accel.flops import count_flops
from callbacks.progress_bar import ProgressBar
from conftest import make_cfg
from pipeline import instantiate, run

ARGS = ["data.num_workers=0", "++model.depth=2", "++model.embed_dim=64", "++model.num_heads=2", "reducer=evit",
        "reducer.locations=[1]", "keep_rate=0.5", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "test=false",
        "+callbacks.rich_progress_bar.console_kwargs.width=80"]


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    """The console output of a short run with an EViT reducer at keep rate 0.5, on an 80-column console."""
    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg(out, ARGS)
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdout", buffer)
        rich.reconfigure(width=80)  # the model summary prints before the bar sets up the console
        run(cfg)
    return SimpleNamespace(text=buffer.getvalue(), out=out, cfg=cfg)


def test_the_config_is_a_few_lines_and_the_full_tree_is_in_config_tree_log(printed):
    lines = printed.text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Config groups: "))
    summary = lines[start:start + 24]
    end = next(i for i, line in enumerate(summary) if line.startswith("Full config:"))
    assert end < 12, "one screen, with room to spare"
    assert summary[end] == f"Full config:   {printed.out}/config_tree.log"
    text = "\n".join(summary[:end])
    for choice in ("model=vit_digits", "reducer=evit", "data=digits", "trainer=default", "experiment=digits"):
        assert choice in text
    assert "Command line:  " in text and "keep_rate=0.5" in text and "trainer.max_epochs=1" in text
    assert "lr_base_batch" not in printed.text, "the tree is not printed"
    tree = open(f"{printed.out}/config_tree.log").read()
    assert tree.startswith("CONFIG") and "lr_base_batch: 512" in tree and "keep_rate: 0.5" in tree


def test_the_model_summary_counts_the_flops_of_one_image(printed):
    module = instantiate(printed.cfg.module)
    image = torch.zeros(1, 3, printed.cfg.data.image_size, printed.cfg.data.image_size)
    flops = get_human_readable_count(count_flops(module, image))
    assert re.search(rf"^Total FLOPs: {re.escape(flops)}\s*$", printed.text, re.M), printed.text
    assert not re.search(r"^Total FLOPs: 0\s*$", printed.text, re.M)


def test_the_progress_bar_is_one_80_column_line_with_loss_val_top1_keep_rate_and_img_s(printed):
    bars = [line for line in printed.text.splitlines() if line.startswith("Epoch 0/0")]
    assert len(bars) == 1, printed.text
    bar = bars[0].rstrip()
    assert len(bar) <= 80, bar
    metrics = dict(re.findall(r"(loss|val top-1|keep|img/s): (\S+)", bar))
    assert set(metrics) == {"loss", "val top-1", "keep", "img/s"}, bar
    assert metrics["keep"] == "0.50" and metrics["val top-1"].endswith("%") and float(metrics["img/s"]) > 0
    for hidden in ("v_num", "val/loss", "train/loss", "it/s"):
        assert hidden not in bar


def test_the_bar_shows_values_already_on_the_host_only():
    # Lightning's progress-bar metrics are floats it has read back for the bar; the rest it does not show.
    trainer = SimpleNamespace(progress_bar_metrics={"train/loss_step": 2.3, "train/loss_epoch": 2.4, "val/loss": 1.0,
                                                    "val/acc1": 0.5, "train/keep_rate": 0.7},
                              callback_metrics={"train/loss": torch.tensor(float("nan"))})
    shown = ProgressBar().get_metrics(trainer, SimpleNamespace(keep_rate=0.7))
    assert shown == {"loss": "2.300", "val top-1": "50.0%", "keep": "0.70"}
    assert ProgressBar().get_metrics(trainer, SimpleNamespace(keep_rate=None)) == {"loss": "2.300", "val top-1": "50.0%"}
