"""Scale-out on one CPU machine: Optuna and submitit sweeps, the SLURM job a sweep would submit,
SIGTERM in the middle of an epoch and the resume, atomic checkpoint writes, and bad input."""
import csv
import glob
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import submitit
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from accel.errors import UserInputError
from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.resume_state import ResumeState
from conftest import FAST, ROOT, make_cfg, run_train
from pipeline import prepare_loggers, run
from scale_out_helpers import start_paused

TESTS = os.path.dirname(os.path.abspath(__file__))
# A tiny EViT on digits: 2 blocks, both reducing.
EVIT = [*FAST, "reducer=evit", "reducer.locations=[0,1]"]
# One epoch of 3 steps: validated, so each job has a best checkpoint whose best/val_acc1 the sweeper reads.
TINY_SWEEP = [*EVIT, "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1"]


def csv_rows(path):
    return list(csv.DictReader(open(path)))


def job_dirs(log_dir):
    return sorted(glob.glob(os.path.join(str(log_dir), "train", "multiruns", "*", "[0-9]")))


def test_optuna_search_runs_each_trial_as_a_basic_launcher_job_and_maximises_val_top1(tmp_path):
    proc = run_train(["-m", "hparams_search=keep_rate_lr", "hydra.sweeper.n_trials=3", *TINY_SWEEP,
                      f"paths.log_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_dirs(tmp_path)
    assert [os.path.basename(j) for j in jobs] == ["0", "1", "2"]
    results = {}
    for job in jobs:
        hydra_cfg = yaml.safe_load(open(os.path.join(job, ".hydra", "hydra.yaml")))["hydra"]
        assert hydra_cfg["launcher"]["_target_"] == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
        overrides = dict(o.split("=", 1) for o in hydra_cfg["overrides"]["task"] if "=" in o)
        assert 0.5 <= float(overrides["keep_rate"]) <= 0.9 and 1e-4 <= float(overrides["module.lr"]) <= 1e-2
        assert os.path.isfile(os.path.join(job, "checkpoints", "last.ckpt"))
        test_rows = [r for r in csv_rows(os.path.join(job, "csv", "metrics.csv")) if r.get("best/val_acc1")]
        results[(float(overrides["keep_rate"]), float(overrides["module.lr"]))] = float(test_rows[-1]["best/val_acc1"])
    assert len(results) == 3, "each trial has its own point"
    best = yaml.safe_load(open(glob.glob(str(tmp_path / "train" / "multiruns" / "*" / "optimization_results.yaml"))[0]))
    assert best["best_value"] == pytest.approx(max(results.values()))
    assert results[(best["best_params"]["keep_rate"], best["best_params"]["module.lr"])] == pytest.approx(best["best_value"])


def test_submitit_local_sweep_runs_each_point_as_its_own_job(tmp_path):
    proc = run_train(["-m", "hydra/launcher=submitit_local", "keep_rate=0.6,0.7", *TINY_SWEEP,
                      f"paths.log_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validated against ConfigStore schema" not in proc.stderr
    jobs = job_dirs(tmp_path)
    assert [os.path.basename(j) for j in jobs] == ["0", "1"]
    pids = set()
    for job, keep_rate in zip(jobs, ("0.6", "0.7")):
        assert f"keep_rate={keep_rate}" in open(os.path.join(job, ".hydra", "overrides.yaml")).read()
        assert os.path.isfile(os.path.join(job, "checkpoints", "last.ckpt"))
        assert any(r.get("best/val_acc1") for r in csv_rows(os.path.join(job, "csv", "metrics.csv")))
        pids.add(yaml.safe_load(open(os.path.join(job, ".hydra", "hydra.yaml")))["hydra"]["job"]["id"])
    submitted = glob.glob(str(tmp_path / "train" / "multiruns" / "*" / ".submitit" / "*" / "*_result.pkl"))
    assert len(submitted) == 2 and len(pids) == 2, "two submitit jobs, one per point"


def test_slurm_launcher_would_submit_one_job_per_point_with_the_configured_resources(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, ["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=8",
                              "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=720",
                              "hydra.launcher.mem_gb=480", "hydra.launcher.constraint=a100",
                              "hydra.launcher.cpus_per_task=12"])
    # submitit's SLURM executor refuses to exist where `srun` is not on PATH; one that never runs is enough.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    submitted = {}

    def capture(executor, fn, *iterables):
        submitted.update(executor=executor, fn=fn, args=list(zip(*iterables)))
        raise RuntimeError("not submitting")
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(RuntimeError, match="not submitting"):
        launcher.launch([["keep_rate=0.5"], ["keep_rate=0.6"], ["keep_rate=0.7"]], initial_job_idx=0)

    assert submitted["fn"] is launcher and len(submitted["args"]) == 3, "one array task per sweep point"
    slurm = submitted["executor"]._executor
    assert isinstance(slurm, submitit.SlurmExecutor)
    sbatch = slurm._make_submission_file_text("python -u -m submitit.core._submit", "uid").splitlines()
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--partition=gpu",
                 "--time=720", "--mem=480GB", "--constraint=a100", "--signal=USR1@120", "--requeue"]:
        assert f"#SBATCH {line}" in sbatch, line
    assert not any("USR2" in line for line in sbatch), "SIGUSR1 goes to Lightning, not to submitit"


def test_wandb_runs_of_a_sweep_share_a_group_and_a_resume_continues_the_saved_run(tmp_path):
    cfg = make_cfg(tmp_path, ["logger=wandb", "hydra.mode=MULTIRUN", "hydra.job.num=3"])
    prepare_loggers(cfg, {"wandb_run_id": "abc123"})
    sweep_name = os.path.basename(HydraConfig.get().sweep.dir)
    assert sweep_name and cfg.logger.wandb.group == sweep_name and cfg.logger.wandb.name == "3:logger=wandb"
    assert cfg.logger.wandb.id == "abc123" and cfg.logger.wandb.resume == "allow"
    single = make_cfg(tmp_path / "single", ["logger=wandb"])
    prepare_loggers(single, None)
    assert not single.logger.wandb.group and "id" not in single.logger.wandb


def read_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def train_until_sigterm(args, step, marker):
    """``python train.py *args`` stopped by SIGTERM from outside after step ``step``; must exit 0."""
    proc = start_paused(args, step, marker)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    # 3 epochs × 6 steps, keep rate from 1 down to 0.5 over epochs 0-1 (EViT's cosine schedule), EMA on,
    # last.ckpt also every 4 steps; SIGTERM arrives from outside after step 9 (epoch 1, batch 3 of 6).
    common = [*EVIT, "keep_rate=0.5", "callbacks=keep_rate", "callbacks.keep_rate_schedule.start_epoch=0",
              "callbacks.keep_rate_schedule.epochs=2", "trainer.max_epochs=3", "trainer.limit_train_batches=6",
              "trainer.limit_val_batches=1", "test=false", "trainer.log_every_n_steps=1", "module.ema_decay=0.9",
              "callbacks.last_checkpoint.every_n_train_steps=4"]
    whole = tmp_path / "whole"
    run(make_cfg(whole, common))

    run_dir = tmp_path / "run"
    train_until_sigterm([*common, f"hydra.run.dir={run_dir}", "logger=[csv,wandb]"], 9, tmp_path / "paused")

    ckpt_dir = run_dir / "checkpoints"
    stopped = read_ckpt(ckpt_dir / "last.ckpt")  # loads: a whole file
    assert stopped["global_step"] == 9 and stopped["epoch"] == 1, "saved after the batch in flight, mid-epoch"
    assert "rng_states" in stopped and stopped["wandb_run_id"]
    best_before = glob.glob(str(ckpt_dir / "epoch_*.ckpt"))
    assert len(best_before) == 1 and read_ckpt(best_before[0])["global_step"] == 6
    assert not glob.glob(str(ckpt_dir / ".*")), "no temporary file is left behind"

    run(make_cfg(run_dir, [*common, "ckpt_path=last", "logger=[csv,wandb]"]))
    resumed, uninterrupted = read_ckpt(ckpt_dir / "last.ckpt"), read_ckpt(whole / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"] == 18
    assert all(read_ckpt(p)["global_step"] in (6, 12, 18) for p in glob.glob(str(ckpt_dir / "epoch_*.ckpt")))

    def by_step(rows, key):
        return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    first, second = csv_rows(run_dir / "csv" / "metrics.csv"), csv_rows(run_dir / "csv" / "resume_1" / "metrics.csv")
    reference = csv_rows(whole / "csv" / "metrics.csv")
    for key in ("train/keep_rate", "lr-AdamW/pg1"):
        before, after = by_step(first, key), by_step(second, key)
        assert max(before) == 8 and min(after) == 9, "the first run's log is kept; the resumed part follows it"
        assert {**before, **after} == pytest.approx(by_step(reference, key)), f"{key} stays on the uninterrupted curve"
    wandb_runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.endswith("-" + stopped["wandb_run_id"]) for p in wandb_runs), \
        "the resumed run continues the same W&B run id"


def test_ddp_sigterm_stops_both_ranks_at_one_step_and_a_rerun_resumes_by_itself(tmp_path):
    # 2 CPU processes, 2 epochs × 8 steps; SIGTERM to rank 0 after step 11, which forwards it to rank 1.
    run_dir = tmp_path / "run"
    args = ["trainer=ddp_sim", *FAST, "data.batch_size=16", "trainer.max_epochs=2", "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=1", "test=false", f"hydra.run.dir={run_dir}"]
    train_until_sigterm(args, 11, tmp_path / "paused")
    assert read_ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 11

    rerun = run_train(args, env_extra={"PYTHONPATH": TESTS})  # ckpt_path unset: resumes from the run dir
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 16
    assert "Resuming from" in open(run_dir / "train.log").read()


def test_under_slurm_sigusr1_is_lightnings_requeue_and_the_requeued_job_resumes_from_its_checkpoint(
        tmp_path, monkeypatch):
    # A one-task SLURM job as Lightning sees it, with `scontrol` recording its arguments instead of requeueing.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (fake_bin / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
             "SLURM_NODELIST": "localhost", "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_NUM_NODES": "1", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1", "test=false",
            "callbacks.last_checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1"]
    proc = start_paused([*args, f"hydra.run.dir={run_dir}"], 9, tmp_path / "paused", env_extra=slurm)
    proc.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit (--signal=USR1@120)
    deadline = time.monotonic() + 60
    while not (tmp_path / "scontrol.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()  # SLURM ends the requeued job
    proc.communicate(timeout=60)
    assert open(tmp_path / "scontrol.log").read().split() == ["requeue", "4242"]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert read_ckpt(hpc)["global_step"] == 9 and read_ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    run(make_cfg(run_dir, args))  # the requeued job: same run dir, ckpt_path unset
    assert read_ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 12
    resumed_steps = [int(r["step"]) for r in csv_rows(run_dir / "csv" / "resume_1" / "metrics.csv") if r.get("train/loss_step")]
    assert min(resumed_steps) == 9, "resumed from Lightning's hpc checkpoint (step 9), the newest, not last.ckpt (step 8)"


def test_sigusr1_outside_slurm_takes_the_sigterm_path(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        LastCheckpoint(dirpath="unused").on_train_start(None, None)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_resume_state_restores_the_random_number_generators():
    callback, checkpoint, trainer = ResumeState(), {}, types.SimpleNamespace(loggers=[])
    torch.manual_seed(1), np.random.seed(1)
    callback.on_save_checkpoint(trainer, None, checkpoint)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(2), np.random.seed(2)
    callback.on_load_checkpoint(trainer, None, checkpoint)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    def die_mid_write(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # as a kill during the save
    monkeypatch.setattr(torch, "save", die_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert read_ckpt(path)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


# --- bad input: one sentence each ------------------------------------------------------------
def test_more_gpus_than_visible(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a node with GPUs (without any: tests/test_user_errors.py)
    with pytest.raises(UserInputError, match=r"trainer.devices=64 but this node has 2 visible GPU"):
        run(make_cfg(tmp_path, [*FAST, "trainer=gpu", "trainer.devices=64"]))


def test_ckpt_path_last_without_a_checkpoint(tmp_path):
    with pytest.raises(UserInputError, match="ckpt_path=last found no checkpoints/last.ckpt"):
        run(make_cfg(tmp_path, [*FAST, "ckpt_path=last"]))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_launcher_plugin_not_installed(tmp_path):
    hide = ("import sys, runpy; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None; "
            f"sys.argv = ['train.py', '-m', 'hydra/launcher=submitit_slurm', 'paths.log_dir={tmp_path}']; "
            "runpy.run_path('train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hydra/launcher=submitit_slurm needs the Hydra plugin hydra-submitit-launcher")
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)
