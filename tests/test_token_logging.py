"""Token-selection pictures for EViT, Evo-ViT and ToMe: rendered, and written by each logger."""
import glob
import os

import numpy as np
import pytest
import timm
import torch

from accel.backbones import create_evo_levit, with_reducer
from accel.reducers import EViT, EvoViT, ToMe
from accel.visualize import render
from conftest import FAST, make_cfg
from pipeline import run


@pytest.mark.parametrize("reducer, panels", [(lambda: EViT(0.5, locations=(1, 3)), 3),
                                              (lambda: EvoViT(0.5, start=2, stages=(2,)), 2),
                                              (lambda: ToMe(r=8), 1 + 6)], ids=["evit", "evo", "tome"])
def test_render_draws_one_panel_per_reducing_block(reducer, panels):
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=6)
    net = with_reducer(vit, reducer())
    picture = render(net, torch.randn(3, 3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    assert picture.dtype == np.uint8 and picture.shape == (2 + 3 * 66, 2 + panels * 66, 3)
    assert picture.std() > 0
    if isinstance(net.reducer, ToMe):
        assert net.tracing is False and net.reducer.trace_source is False, "tracing is switched back off"


def test_render_draws_evo_levit_stages_on_their_own_grids():
    """Any token-reducing network is drawn from its typed selections: Evo-LeViT selects once per
    pruned stage (2×2 and 1×1 grids at 64 px), each panel upsampled from its stage's grid."""
    net = create_evo_levit("evo_levit_128s", [1, 1] + [0.5] * 7, [0.5] * 3, num_classes=5, img_size=64).train()
    picture = render(net, torch.zeros(1, 3, 64, 64), (0.5,) * 3, (0.5,) * 3)   # a flat grey image
    assert picture.shape == (2 + 66, 2 + 3 * 66, 3) and net.training, "input + 2 stages; training mode restored"
    panel = picture[2:66, 68:132]
    cells = [panel[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
    assert all((cell == cell[0, 0]).all() for cell in cells), "one colour per cell of the 2×2 grid"
    assert len({tuple(cell[0, 0]) for cell in cells}) > 1, "the cells differ (attention, slow path)"
    last = picture[2:66, 134:198]
    assert (last == last[0, 0]).all(), "the last stage's grid is one token"


LOGGED = [*FAST, "reducer=evit", "reducer.locations=[0,1]", "keep_rate=0.5", "callbacks=token_selection",
          "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "trainer.max_epochs=1",
          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]


def test_csv_run_writes_pngs(tmp_path):
    run(make_cfg(tmp_path, LOGGED))
    assert os.path.isfile(tmp_path / "token_selection" / "epoch_000.png")


def test_tensorboard_run_logs_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(make_cfg(tmp_path, [*LOGGED, "logger=tensorboard"]))
    events = glob.glob(str(tmp_path / "tensorboard" / "**" / "events.out.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"images": 0})
    acc.Reload()
    assert "token_selection" in acc.Tags()["images"]


def test_wandb_offline_run_holds_metrics_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(make_cfg(tmp_path, [*LOGGED, "logger=wandb"]))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "files", "media", "images", "token_selection*.png"))
    assert glob.glob(os.path.join(runs[0], "run-*.wandb"))


def test_visualize_tokens_script_for_a_checkpoint(tmp_path):
    import sys
    from conftest import ROOT, run_train, write_jpeg_folder
    proc = run_train([*(a for a in LOGGED if a != "callbacks=token_selection"), f"paths.log_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = glob.glob(str(tmp_path / "train" / "runs" / "*" / "checkpoints" / "last.ckpt"))[0]
    photos = write_jpeg_folder(tmp_path / "photos", classes=1, per_class=3, size=(48, 40), splits=("any",))
    import subprocess
    out = tmp_path / "tokens.png"
    done = subprocess.run([sys.executable, "scripts/visualize_tokens.py", "--ckpt", ckpt, "--images", photos,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image
    picture = Image.open(out)
    # 3 images × (input + 2 EViT reduction blocks) of 32 px with 2 px padding.
    assert picture.size == (2 + 3 * 34, 2 + 3 * 34)
    bad = subprocess.run([sys.executable, "scripts/visualize_tokens.py", "--ckpt", ckpt, "--images", "/no/dir"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: --images '/no/dir' is not a directory" in bad.stderr
