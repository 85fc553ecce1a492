"""Token-selection pictures for EViT, Evo-ViT and ToMe: rendered, and written by each logger."""
import glob
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch

from accel.backbones import create_evo_levit, with_reducer
from accel.reducers import EViT, EvoViT, ToMe
from accel.reducers.selection import Selection
from accel.visualize import STYLES, Panel, draws, panels, render, selection_figure, to_array
from conftest import FAST, make_cfg
from pipeline import run


@pytest.mark.parametrize("reducer, titles, legend", [
    (lambda: EViT(0.5, locations=(1, 3), fuse_token=False), ["block 1: 32/64 kept", "block 3: 16/64 kept"], ["dimmed: patches dropped"]),
    (lambda: EvoViT(0.5, start=2, stages=(2,)), ["block 2: 32/64 slow"],
     ["heat map: global class attention", "dimmed: fast tokens"]),
    (lambda: ToMe(r=8), [f"block {i}: {64 - 8 * (i + 1)}/64 left" for i in range(6)], ["colours: patches merged"]),
], ids=["evit", "evo", "tome"])
def test_render_titles_every_panel_and_explains_the_colours(reducer, titles, legend):
    """One row per image: the input titled with its name and the prediction, then a panel per
    reducing block titled with the block and the tokens kept (EViT without fusion: ceil(0.5·64),
    ceil(0.5·32)),
    on the slow path (Evo-ViT: int(0.5·64)) or left (ToMe: 8 fewer per block) of the 64 patches;
    the legend says what the dimming, the heat map and the colours mean."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=6, num_classes=5)
    net = with_reducer(vit, reducer())
    images = torch.randn(3, 3, 64, 64)
    fig = render(net, images, (0.5,) * 3, (0.5,) * 3, names=["a.jpg", "b.jpg", "c.jpg"], class_names=list("vwxyz"))
    with torch.no_grad():
        preds = net.eval()(images).argmax(-1).tolist()
    shown = [ax.get_title() for ax in fig.axes]
    assert shown == [t for b, name in enumerate(["a.jpg", "b.jpg", "c.jpg"])
                     for t in [f"{name}\npred {'vwxyz'[preds[b]]}", *titles]]
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(entries) == len(legend) and all(e.startswith(want) for e, want in zip(entries, legend))
    picture = to_array(fig)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.std() > 0
    if isinstance(net.reducer, ToMe):
        assert net.tracing is False and net.reducer.trace_source is False, "tracing is switched back off"


def test_render_draws_evo_levit_stages_on_their_own_grids():
    """Any token-reducing network is drawn from its typed selections: Evo-LeViT selects once per
    pruned stage (2×2 and 1×1 grids at 64 px), each panel upsampled from its stage's grid."""
    net = create_evo_levit("evo_levit_128s", [1, 1] + [0.5] * 7, [0.5] * 3, num_classes=5, img_size=64).train()
    fig = render(net, torch.zeros(1, 3, 64, 64), (0.5,) * 3, (0.5,) * 3)   # a flat grey image
    assert net.training, "training mode restored"
    assert [ax.get_title() for ax in fig.axes][1:] == ["block 2: 2/4 slow", "block 5: 0/1 slow"]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 64, 64))
    _, first, last = panels(np.full((1, 64, 64, 3), 0.5), net.selections)[0]
    cells = [first.image[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
    assert all((cell == cell[0, 0]).all() for cell in cells), "one colour per cell of the 2×2 grid"
    assert len({tuple(cell[0, 0]) for cell in cells}) > 1, "the cells differ (attention, slow path)"
    assert (last.image == last.image[0, 0]).all(), "the last stage's grid is one token"


def test_a_new_selection_kind_is_drawn_once_registered():
    """Drawing dispatches on the selection's type through accel.visualize.STYLES: an unknown kind is
    refused in one sentence, a registered one gets its panel, title and legend entry."""
    @dataclass(frozen=True, eq=False)
    class Marked(Selection):
        pass
    image = np.zeros((1, 8, 8, 3))
    with pytest.raises(TypeError, match="No picture for a Marked"):
        panels(image, [Marked(2, (2, 2))])
    try:
        draws(Marked, (("red",), "red: marked"))(lambda img, entry, b, memo: Panel(img, f"block {entry.block}: marked"))
        fig = selection_figure(image, [Marked(2, (2, 2))], ["x"])
        assert [ax.get_title() for ax in fig.axes] == ["x", "block 2: marked"]
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["red: marked"]
    finally:
        STYLES.pop(Marked)


LOGGED = [*FAST, "reducer=evit", "reducer.locations=[0,1]", "keep_rate=0.5", "callbacks=token_selection",
          "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "trainer.max_epochs=1",
          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]


def test_csv_run_writes_pngs_titled_with_labels_and_predictions(tmp_path, monkeypatch):
    import callbacks.token_logging as token_logging
    figures, draw = [], token_logging.selection_figure
    monkeypatch.setattr(token_logging, "selection_figure", lambda *a, **k: figures.append(draw(*a, **k)) or figures[-1])
    run(make_cfg(tmp_path, LOGGED))
    assert os.path.isfile(tmp_path / "token_selection" / "epoch_000.png")
    titles = [ax.get_title() for ax in figures[0].axes]
    # 6 fixed validation images (digits: labels 0-9) × (input + EViT's blocks 0 and 1 at keep rate 0.5).
    firsts = titles[::3]
    assert len(titles) == 6 * 3 and all(re.fullmatch(r"label \d, pred \d [✓✗]", t) for t in firsts), firsts
    # 16 patches: ceil(0.5·16) kept at block 0, ceil(0.5·9) of them and the fused token at block 1.
    assert titles[1] == "block 0: 8/16 kept" and re.fullmatch(r"block 1: [45]/16 kept", titles[2])
    assert figures[0].texts[0].get_text() == "epoch 0, step 2, keep rate 0.5"


def test_tensorboard_run_logs_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(make_cfg(tmp_path, [*LOGGED, "logger=tensorboard"]))
    events = glob.glob(str(tmp_path / "tensorboard" / "**" / "events.out.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"images": 0})
    acc.Reload()
    assert "token_selection" in acc.Tags()["images"]


def test_wandb_offline_run_holds_an_image_per_epoch_with_its_caption(tmp_path, monkeypatch):
    """One picture per validation epoch, each at its own W&B step (the media panel's slider walks
    through the epochs), captioned with epoch, training step and keep rate."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    two_epochs = [a for a in LOGGED if not a.startswith(("trainer.max_epochs", "trainer.limit_train_batches"))]
    run(make_cfg(tmp_path, [*two_epochs, "trainer.max_epochs=2", "trainer.limit_train_batches=1", "logger=wandb"]))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    pictures = glob.glob(os.path.join(runs[0], "files", "media", "images", "token_selection_*.png"))
    steps = sorted(int(os.path.basename(p).split("_")[2]) for p in pictures)
    assert len(steps) == 2 and steps[0] < steps[1], pictures
    record = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()   # the offline run's history
    for text in ("epoch 0, step 1, keep rate 0.5", "epoch 1, step 2, keep rate 0.5"):
        assert b"captions" in record and text.encode() in record, text


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
    assert Image.open(out).format == "PNG"
    # 3 images (rows) × (input + the 2 EViT reduction blocks of the run).
    assert f"wrote {out}: 3 images (0.JPEG, 1.JPEG, 2.JPEG), columns: input, block 0, block 1" in done.stdout
    bad = subprocess.run([sys.executable, "scripts/visualize_tokens.py", "--ckpt", ckpt, "--images", "/no/dir"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: --images '/no/dir' is not a directory" in bad.stderr
