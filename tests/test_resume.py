"""Resume as a user runs it: Ctrl-C saves and names the resume command, `python train.py ckpt_path=last
hydra.run.dir=<run>` continues the run with its saved config (also after the directory was moved), keeps
the run's record and writes its own beside it, refuses changes not marked as deliberate and a finished
run; unwritable checkpoint or log directories stop the run before training."""
import glob
import os
import shutil
import signal

import pytest
import torch
import yaml

from accel.errors import UserInputError
from conftest import QUIET, make_cfg, run_train
from pipeline import run
from scale_out_helpers import TESTS, start_paused

# A 2-block DeiT-T on 32-px synthetic images: 4 steps per epoch.
TINY = ["data=synthetic", "model=deit_t", "++model.depth=2", "data.image_size=32", "data.num_classes=5",
        "data.batch_size=16", "trainer=cpu", "logger=csv", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", *QUIET]
RECORD = [".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "config_tree.log"]


def launch(args):
    return run_train(args, env_extra={"PYTHONPATH": TESTS})


def read_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(run_dir):
    return {name: open(os.path.join(run_dir, name), "rb").read() for name in RECORD}


def last_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 3-epoch run stopped by Ctrl-C after step 5 (epoch 1, batch 2 of 4): its dir and output."""
    base = tmp_path_factory.mktemp("stopped")
    run_dir, marker = base / "run", base / "paused"
    proc = start_paused([*TINY, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"], 5, marker)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return run_dir, proc.returncode, open(f"{marker}.stdout").read() + err


def copy_of(stopped_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run[0], run_dir)
    return run_dir


def test_ctrl_c_saves_the_batch_in_flight_and_prints_the_resume_command(stopped_run):
    run_dir, returncode, output = stopped_run
    assert returncode == 0, output[-3000:]
    assert read_ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 5, "saved after the batch in flight"
    command = f"python train.py ckpt_path=last hydra.run.dir={run_dir}"
    assert command in output and command in open(run_dir / "train.log").read()


def test_the_readme_resume_continues_a_moved_run_as_configured_and_keeps_its_record(stopped_run, tmp_path):
    run_dir = copy_of(stopped_run, tmp_path)  # a copy: the checkpoint names the original directory
    record = snapshot(run_dir)
    proc = launch(["ckpt_path=last", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = read_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 12, "the run's own 3 epochs of 4 steps, not today's defaults"
    assert snapshot(run_dir) == record, "the run's record is left as it was"
    assert yaml.safe_load(open(run_dir / ".hydra" / "resume_1" / "overrides.yaml")) == ["ckpt_path=last"]
    assert yaml.safe_load(open(run_dir / ".hydra" / "resume_1" / "config.yaml"))["trainer"]["max_epochs"] == 3
    assert os.path.isfile(run_dir / "config_tree_resume_1.log")
    # The best checkpoint is tracked in the new place: one file kept by score, and tested.
    best = glob.glob(str(run_dir / "checkpoints" / "epoch_*.ckpt"))
    assert len(best) == 1, best
    states = [s for k, s in last["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor': 'val/acc1'")]
    assert states[0]["best_model_path"] == best[0]
    assert "best/val_acc1" in open(run_dir / "csv" / "resume_1" / "metrics.csv").readline()


def test_changes_are_refused_unless_allowed_and_a_finished_run_is_not_reused(stopped_run, tmp_path):
    run_dir = copy_of(stopped_run, tmp_path)
    record = snapshot(run_dir)
    line = last_error(launch(["ckpt_path=last", f"hydra.run.dir={run_dir}", "module.lr=0.001"]))
    assert line == (f"error: resuming {run_dir} with module.lr=0.001, which differs from the run's 0.0005; resume "
                    "without it to continue the run as it was configured, or add resume.allow=[module.lr] to change "
                    "it deliberately.")
    assert open(run_dir / "train.log").read().rstrip().endswith(line), "the sentence is in train.log too"
    assert snapshot(run_dir) == record and os.path.isdir(run_dir / ".hydra" / "resume_1")

    proc = launch(["ckpt_path=last", f"hydra.run.dir={run_dir}", "trainer.max_epochs=4",
                   "resume.allow=[trainer.max_epochs]", "test=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 16
    assert yaml.safe_load(open(run_dir / ".hydra" / "resume_2" / "changes.yaml")) == \
        {"trainer.max_epochs": {"run": "3", "resume": "4"}}
    assert snapshot(run_dir) == record

    # The run is finished now: reusing its directory trains nothing on top of it, with or without changes.
    before = os.path.getmtime(run_dir / "checkpoints" / "last.ckpt")
    line = last_error(launch([f"hydra.run.dir={run_dir}", "module.lr=0.001"]))
    assert "with module.lr=0.001, which differs from the run's 0.0005" in line
    line = last_error(launch([f"hydra.run.dir={run_dir}"]))
    assert line.startswith(f"error: {run_dir} holds a finished run (trained to global step 16)")
    assert os.path.getmtime(run_dir / "checkpoints" / "last.ckpt") == before


@pytest.mark.parametrize("key", ["callbacks.model_checkpoint.dirpath", "logger.csv.save_dir"])
def test_an_unwritable_directory_stops_the_run_before_training(tmp_path, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # nothing can be created below a regular file, not even by root
    with pytest.raises(UserInputError, match=rf"directory of \w+ {blocker}/sub is not writable"):
        run(make_cfg(tmp_path / "run", [*TINY, "trainer.max_steps=2", f"{key}={blocker}/sub"]))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "last.ckpt")


def test_a_deliberate_change_that_fails_its_checks_does_not_become_the_runs_config(stopped_run, tmp_path):
    run_dir = copy_of(stopped_run, tmp_path)
    line = last_error(launch(["ckpt_path=last", f"hydra.run.dir={run_dir}", "++model.embed_dim=96",
                              "resume.allow=[model.embed_dim]"]))
    assert "does not fit the configured model" in line
    proc = launch(["train=false", "ckpt_path=last", f"hydra.run.dir={run_dir}"])  # evaluates with the run's model
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/val_acc1" in open(run_dir / "csv" / "resume_1" / "metrics.csv").readline()
