"""What a DDP run computes, on 2 CPU processes (trainer=ddp_sim) with the DeiT-S recipe as shipped
(EMA, repeated augmentation and its sampler), shrunk in model width/depth, batch, image size, class
count and steps, with gradient accumulation 2:

- the EMA trains under DDP, is validated (val/ema_acc1), saved (ema.*) and restored on resume;
- validation and test are sharded over the ranks (each evaluates its half), while the training
  sampler stays the repeated-augmentation one, and the synced metrics equal a single-process
  evaluation of the same checkpoint;
- the optimizer runs at lr × batch × world × accumulate / lr_base_batch.

One run and its resume serve every test here (a launch costs ~20 s)."""
import csv
import glob
import json
import os

import pytest
import torch

from conftest import QUIET, make_cfg, run_train, write_jpeg_folder
from pipeline import build

TESTS = os.path.dirname(os.path.abspath(__file__))
WORLD, BATCH, ACCUMULATE, VAL_IMAGES = 2, 4, 2, 10  # VAL_IMAGES divisible by WORLD: no padded duplicates


def recipe(data_root):
    """experiment=deit_s_in1k, shrunk; warm-up 0 so that step 0 runs at the scaled LR."""
    return ["experiment=deit_s_in1k", f"data.root={data_root}", "data.num_classes=2", "data.image_size=32",
            f"data.batch_size={BATCH}", "++model.depth=1", "++model.embed_dim=32", "++model.num_heads=2",
            f"trainer.accumulate_grad_batches={ACCUMULATE}", "trainer.limit_train_batches=4",
            "module.warmup_epochs=0", "trainer.log_every_n_steps=1", *QUIET]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-step run under ddp_sim (one epoch: 4 batches per rank, accumulated by 2), then its resume
    to step 4. Returns the run directory, the probes' folder and the EMA of last.ckpt as saved by
    the first launch."""
    tmp = tmp_path_factory.mktemp("ddp_run")
    # The repeated-augmentation sampler draws len // 256 * 256 images per epoch: train/ holds 256.
    data = write_jpeg_folder(tmp / "data", classes=2, per_class=128, size=(32, 32), splits=("train",))
    write_jpeg_folder(tmp / "data", classes=2, per_class=VAL_IMAGES // 2, size=(32, 32), splits=("val",), seed=1)
    run_dir, probes = tmp / "run", tmp / "probes"
    env = {"PYTHONPATH": TESTS}
    first = run_train([*recipe(data), "trainer=ddp_sim", f"trainer.devices={WORLD}", "trainer.max_steps=2",
                       f"hydra.run.dir={run_dir}",
                       "+callbacks.train_sampler._target_=scale_out_helpers.RecordSampler",
                       f"+callbacks.train_sampler.out={probes}",
                       "+callbacks.eval_samplers._target_=ddp_probes.RecordEvalSamplers",
                       f"+callbacks.eval_samplers.out={probes}",
                       "+callbacks.ema_probe._target_=ddp_probes.RecordEmaAtTrainStart",
                       f"+callbacks.ema_probe.out={probes}"], env_extra=env)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    saved_ema = {k[len("ema."):]: v for k, v in saved["state_dict"].items() if k.startswith("ema.")}
    resumed = run_train(["ckpt_path=last", f"hydra.run.dir={run_dir}", "trainer.max_steps=4",
                         "resume.allow=[trainer.max_steps]"], env_extra=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"data": data, "run_dir": run_dir, "probes": probes, "saved_ema": saved_ema}


def metric_rows(run_dir):
    """Metric rows of every launch in the run directory, oldest launch first."""
    files = sorted(glob.glob(os.path.join(run_dir, "csv", "**", "metrics.csv"), recursive=True), key=os.path.getmtime)
    return [list(csv.DictReader(open(f))) for f in files]


def logged(rows, name):
    return [float(r[name]) for r in rows if r.get(name)]


def test_ema_is_validated_saved_and_restored_under_ddp(ddp_run):
    first, resumed = metric_rows(ddp_run["run_dir"])
    assert logged(first, "val/ema_acc1") and logged(resumed, "val/ema_acc1") and logged(first, "best/val_ema_acc1")
    saved = ddp_run["saved_ema"]
    assert saved, "the EMA is in the checkpoint's state dict"
    for rank in range(WORLD):
        restored = torch.load(ddp_run["probes"] / f"ema_step2_rank{rank}.pt", weights_only=True)
        assert restored.keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(restored[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
    last = torch.load(ddp_run["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    moved = [k for k, v in saved.items() if v.is_floating_point() and not torch.equal(last["state_dict"]["ema." + k], v)]
    assert moved, "the resumed launch went on averaging"


def test_eval_is_sharded_and_the_train_sampler_kept(ddp_run):
    probes = ddp_run["probes"]
    for stage in ("val", "test"):
        shares = [json.load(open(probes / f"{stage}_rank{r}.json")) for r in range(WORLD)]
        assert [len(s) for s in shares] == [VAL_IMAGES // WORLD] * WORLD, f"{stage}: each rank evaluates its half"
        assert sorted(shares[0] + shares[1]) == list(range(VAL_IMAGES))
    train = [json.load(open(probes / f"rank{r}.json")) for r in range(WORLD)]
    assert all(t["type"] == "RankedRepeatAugSampler" and t["world"] == WORLD for t in train)


def test_sharded_metrics_equal_a_single_process_evaluation_of_the_checkpoint(ddp_run, tmp_path):
    (first, _) = metric_rows(ddp_run["run_dir"])
    # The first launch validated after its epoch (step 2, the weights of epoch_000.ckpt) and tested
    # its best checkpoint, the same file.
    (ckpt,) = glob.glob(str(ddp_run["run_dir"] / "checkpoints" / "epoch_*.ckpt"))
    cfg = make_cfg(tmp_path, [*recipe(ddp_run["data"]), "trainer=cpu", "trainer.devices=1", "logger=none"])
    datamodule, module, trainer = build(cfg)
    single = {}
    for evaluate in (trainer.validate, trainer.test):
        evaluate(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=False, verbose=False)
        single.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    # The launch's final evaluation of its best checkpoint (best/val_*) against this evaluation of the
    # given file (eval/val_*).
    for launch, here in (("val/", "val/"), ("best/val_", "eval/val_")):
        for name in ("acc1", "acc5", "ema_acc1", "ema_acc5", "loss"):
            assert logged(first, launch + name)[-1] == pytest.approx(single[here + name], rel=1e-5), launch + name


def test_lr_is_scaled_by_world_size_and_accumulation(ddp_run):
    (first, _) = metric_rows(ddp_run["run_dir"])
    lr = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in first if r.get("lr-AdamW/pg1")}
    # DeiT-S recipe: 5e-4 × 4 images × 2 processes × 2 accumulated batches / 512
    assert lr[0] == pytest.approx(5e-4 * BATCH * WORLD * ACCUMULATE / 512)
