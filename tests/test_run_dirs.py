"""Every run gets its own directory, also two launches in the same second."""
import os
import subprocess
import sys

import datetime

import hydra.core.utils
import pytest
import yaml

from conftest import ROOT, make_cfg
from test_resume import TINY

from run_dirs import new_dir  # registers the resolvers the config uses


def test_the_default_run_and_sweep_directories_are_claimed_once_per_launch(tmp_path, monkeypatch):
    # Both launches read the same clock, as two launches in the same second do.
    class SameSecond(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(hydra.core.utils, "datetime", SameSecond)
    for key in ("run", "sweep"):
        first, second = (str(make_cfg(tmp_path)["hydra"][key]["dir"]) for _ in range(2))
        assert first != second and os.path.isdir(first) and os.path.isdir(second)
        assert os.path.basename(second) == os.path.basename(first) + "_1"


def test_two_concurrent_launches_get_their_own_directory_record_and_checkpoints(tmp_path):
    base = tmp_path / "runs" / "same"
    procs = [subprocess.Popen([sys.executable, "train.py", *TINY, "trainer.max_steps=2", f"seed={seed}",
                               f"hydra.run.dir=${{new_dir:{base}}}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    dirs = sorted(os.listdir(base.parent))
    assert dirs == ["same", "same_1"]
    seeds = set()
    for name in dirs:
        run_dir = base.parent / name
        seed = yaml.safe_load(open(run_dir / ".hydra" / "config.yaml"))["seed"]
        assert f"seed={seed}" in yaml.safe_load(open(run_dir / ".hydra" / "overrides.yaml")), "a record of its own"
        seeds.add(seed)
        for path in ("checkpoints/last.ckpt", "csv/metrics.csv", "config_tree.log", "train.log"):
            assert os.path.isfile(run_dir / path), (name, path)
        assert not os.path.exists(run_dir / ".hydra" / "resume_1"), "each launch found a new directory"
    assert seeds == {1, 2}


def test_an_unwritable_log_directory_stops_the_launch_in_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stopped:
        new_dir(f"{blocker}/logs/train/runs/now")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: cannot create the run directory {blocker}/logs/train/runs/now "
                                               "(Not a directory); expected a writable paths.log_dir (or "
                                               "hydra.run.dir=<a writable directory>).")
