"""train.py as a user runs it: bad input gives one sentence and exit code 2; multirun; DDP."""
import collections
import csv
import glob
import json
import os

import pytest
import torch

from conftest import FAST, run_train, write_jpeg_folder

OUT = lambda tmp: [f"paths.log_dir={tmp}"]  # noqa: E731


def assert_one_sentence(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in err[-1]


def test_run_cli_returns_logs_the_sentence_and_exits_2_or_logs_the_traceback_and_raises(capsys):
    from accel.errors import UserInputError, run_cli
    logged = []
    assert run_cli(lambda: 0.75, log=logged.append) == 0.75 and logged == []

    def bad_input():
        raise UserInputError("keep_rate=2 is outside (0, 1].")
    with pytest.raises(SystemExit) as exit_:
        run_cli(bad_input, log=logged.append)
    assert exit_.value.code == 2 and logged == ["error: keep_rate=2 is outside (0, 1]."]
    assert capsys.readouterr().err == "error: keep_rate=2 is outside (0, 1].\n"

    def bug():
        raise ZeroDivisionError("boom")
    with pytest.raises(ZeroDivisionError):
        run_cli(bug, log=logged.append)
    assert logged[-1].startswith("Traceback") and logged[-1].rstrip().endswith("ZeroDivisionError: boom")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_keep_rate_outside_unit_interval(tmp_path, value):
    proc = run_train([f"keep_rate={value}", *OUT(tmp_path)])
    assert_one_sentence(proc, f"keep_rate={value} is outside (0, 1]")


def test_missing_ckpt_path(tmp_path):
    proc = run_train(["ckpt_path=/no/such/last.ckpt", *OUT(tmp_path)])
    assert_one_sentence(proc, "ckpt_path='/no/such/last.ckpt' does not exist")


def test_missing_data_root(tmp_path):
    proc = run_train(["data=imagenet", "data.root=/no/such/imagenet", *OUT(tmp_path)])
    assert_one_sentence(proc, "data.root='/no/such/imagenet' is not a directory")


def test_unset_data_root(tmp_path):
    proc = run_train(["data=imagenet", *OUT(tmp_path)])
    assert_one_sentence(proc, "data.root is required and not set", "data.root=/datasets/imagenet")


def test_corrupt_image_stops_training_naming_the_file(tmp_path):
    root = write_jpeg_folder(tmp_path / "in", per_class=4, size=(64, 64))
    bad = os.path.join(root, "train", "class0", "2.JPEG")
    open(bad, "wb").write(b"not a jpeg")
    proc = run_train(["data=imagenet", f"data.root={root}", "data.num_classes=2", "data.image_size=32",
                      "data.batch_size=2", "data.num_workers=1", "model=vit_digits", *FAST, "trainer.max_epochs=1",
                      *OUT(tmp_path)])
    assert_one_sentence(proc, "class0/2.JPEG could not be decoded")


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    proc = run_train([*FAST, "debug=limit", "trainer.max_epochs=1", "test=false", *OUT(tmp_path / "a")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = glob.glob(str(tmp_path / "a" / "train" / "runs" / "*" / "checkpoints" / "last.ckpt"))[0]
    before = os.path.getmtime(ckpt)
    proc = run_train([*FAST, "++model.embed_dim=32", f"ckpt_path={ckpt}", *OUT(tmp_path / "b")])
    assert_one_sentence(proc, f"ckpt_path='{ckpt}' does not fit the configured model", "has shape")
    assert os.path.getmtime(ckpt) == before, "the checkpoint is left as it was"


def test_multirun_gives_each_job_its_own_directory_and_wandb_run(tmp_path):
    proc = run_train(["-m", "model=deit_t,deit_s", "data=synthetic", "trainer.max_steps=2", "data.image_size=32",
                      "data.batch_size=4", "data.num_classes=5", "trainer.limit_val_batches=1",
                      "trainer.limit_test_batches=1", "callbacks.rich_progress_bar=null", "logger=[csv,wandb]",
                      *OUT(tmp_path)], env_extra={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(glob.glob(str(tmp_path / "train" / "multiruns" / "*" / "[0-9]")))
    assert [os.path.basename(j) for j in jobs] == ["0", "1"]
    names = []
    for job in jobs:
        assert os.path.isfile(os.path.join(job, "checkpoints", "last.ckpt"))
        assert os.path.isfile(os.path.join(job, "csv", "metrics.csv"))
        assert len(glob.glob(os.path.join(job, "wandb", "offline-run-*"))) == 1, "one W&B run per job"
        names.append(open(os.path.join(job, ".hydra", "overrides.yaml")).read())
    assert "model=deit_t" in names[0] and "model=deit_s" in names[1]


def test_ddp_sim_trains_with_two_processes_and_repeated_augmentation(tmp_path):
    # DeiT's repeated augmentation (3 copies per image) under 2-process DDP; each rank records its sampler.
    samplers = tmp_path / "samplers"
    proc = run_train(["trainer=ddp_sim", *FAST, "debug=limit", "data.batch_size=16", "trainer.log_every_n_steps=1",
                      "+data.repeated_aug=3", "+callbacks.record._target_=scale_out_helpers.RecordSampler",
                      f"+callbacks.record.out={samplers}", *OUT(tmp_path)],
                     env_extra={"PYTHONPATH": os.path.dirname(os.path.abspath(__file__))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "train" / "runs" / "*"))
    assert len(runs) == 1, "rank 1 runs in the directory rank 0 claimed"
    run_dir = runs[0]
    assert not os.path.exists(os.path.join(run_dir, ".hydra", "resume_1")), "rank 1 is not taken for a resume"
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6  # 2 epochs × 3 batches per process
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("val/acc1")]) == 2, "validation is logged once per epoch, not once per process"
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss_step")) == list(range(6)), "one row per step"

    ranks = [json.load(open(samplers / f"rank{r}.json")) for r in (0, 1)]
    # Lightning kept the datamodule's sampler (not re-sharded through a DistributedSamplerWrapper) ...
    assert all(r["type"] == "RankedRepeatAugSampler" and r["world"] == 2 for r in ranks)
    # ... so each rank draws its share: DeiT's count, floor(1437 // 256 * 256 / 2) = 640 images per epoch,
    assert [len(r["indices"]) for r in ranks] == [640, 640]
    # and the copies of an image are spread over the ranks: consecutive copies go to different ranks.
    seen = [set(r["indices"]) for r in ranks]
    assert len(seen[0] & seen[1]) > 0.9 * min(len(s) for s in seen)
    per_rank = [collections.Counter(r["indices"]) for r in ranks]
    assert max(max(c.values()) for c in per_rank) == 2 and max((per_rank[0] + per_rank[1]).values()) == 3
