"""scripts/digits_table.py as a user runs it: one train.py per row, accuracies read from each run's CSV
log, the off-the-shelf rows evaluating the baseline's best checkpoint, failures reported in their row."""
import csv
import glob
import math
import os
import subprocess
import sys

import yaml

from conftest import QUIET, ROOT, child_env

SCRIPT = os.path.join(ROOT, "scripts", "digits_table.py")
# Every run one epoch of 2 steps, validated and tested on one batch: the train.py start-up dominates.
SHRINK = " ".join([*QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                   "trainer.limit_test_batches=1"])


def table(out_dir, *args):
    done = subprocess.run([sys.executable, SCRIPT, "--out-dir", str(out_dir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=child_env())
    path = os.path.join(out_dir, "digits_table.csv")
    rows = {r["row"]: r for r in csv.DictReader(open(path))} if os.path.isfile(path) else {}
    return done, rows


def test_baseline_and_an_off_the_shelf_row_on_the_baselines_best_checkpoint(tmp_path):
    done, rows = table(tmp_path, "--only", "baseline", "topk_shelf", "--extra", SHRINK)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(rows) == ["baseline", "topk_shelf"]
    for r in rows.values():
        assert math.isfinite(float(r["val_top1"])) and 0 <= float(r["val_top1"]) <= 1
        assert float(r["wall_s"]) > 0 and r["exit_code"] == "0"
    assert rows["baseline"]["wall_x_baseline"] == "1.00" and float(rows["baseline"]["gmacs"]) > 0
    # The evaluation ran on the baseline's best checkpoint, configured as the Top-K row.
    best, = glob.glob(str(tmp_path / "baseline" / "checkpoints" / "epoch_*.ckpt"))
    assert rows["topk_shelf"]["start_checkpoint"] == best
    launched = yaml.safe_load(open(tmp_path / "topk_shelf" / ".hydra" / "overrides.yaml"))
    assert {"experiment=topk_digits", "train=false", f"ckpt_path={best}"} <= set(launched)
    md = open(tmp_path / "digits_table.md").read()
    assert md in done.stdout
    assert f"| Top-K kr 0.7 | — | — | — | — | — | {100 * float(rows['topk_shelf']['val_top1']):.2f} % |" in md


def test_a_failed_run_is_reported_in_its_row_and_the_script_fails(tmp_path):
    # A mistyped key: train.py refuses it before importing torch, so this costs under a second.
    done, rows = table(tmp_path, "--only", "patchmerger", "ats", "--extra", "trainer.max_epoch=1")
    assert done.returncode == 1
    assert [rows[n]["exit_code"] for n in ("patchmerger", "ats")] == ["2", "2"], "the second row still ran"
    assert "trainer.max_epochs" in rows["ats"]["error"] and not rows["ats"]["val_top1"]
    assert "| PatchMerger kr 0.7 | `experiment=patchmerger_digits` | failed (exit 2) |" in done.stdout
    # A later invocation into the same directory adds its rows to the table.
    done, rows = table(tmp_path, "--only", "kmedoids", "--extra", "trainer.max_epoch=1")
    assert done.returncode == 1 and sorted(rows) == ["ats", "kmedoids", "patchmerger"]


def test_rows_are_refused_before_anything_runs(tmp_path):
    # A row whose directory holds a run (train.py would continue it), and one that needs the baseline.
    (tmp_path / "ats").mkdir()
    done, rows = table(tmp_path, "--only", "topk", "ats")
    assert done.returncode == 2 and not rows and not os.path.exists(tmp_path / "topk.log")
    assert "already holds the run(s) ats" in done.stderr
    done, rows = table(tmp_path, "--only", "dynamicvit")
    assert done.returncode == 2 and not rows
    assert "dynamicvit" in done.stderr and "baseline in --only" in done.stderr
