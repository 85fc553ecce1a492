"""The README's table of token-reduction baselines on digits, in one invocation: every method trained with
the one digits recipe (``experiment/digits.yaml``, 30 epochs; each method's experiment file adds only its
reducer), and the parameter-free methods evaluated off the shelf on the trained baseline.

    flock /tmp/accel-cpu.lock python scripts/digits_table.py              # all rows, ~25 min on 2 CPU cores
    python scripts/digits_table.py --dry-run                              # the commands, run nothing
    python scripts/digits_table.py --only baseline topk topk_shelf --out-dir /tmp/t \
        --extra "trainer.max_epochs=1 trainer.limit_train_batches=2"      # a few rows, shrunk

Each row is one ``python train.py <overrides> hydra.run.dir=<out-dir>/<row>``, run one after another. The
baseline runs first: DynamicViT fine-tunes its ``last.ckpt`` (its authors' recipe starts from a trained
model), and the off-the-shelf rows (``<row>_shelf``: the row's own overrides plus ``train=false ckpt_path=<the
baseline's best checkpoint>``, no training) evaluate the weights whose accuracy the baseline row reports, so
the difference is the reducer's alone. Accuracy is the run's own record, never its console: ``best/val_acc1``
(val top-1 of the best checkpoint) or, for an evaluation, ``eval/val_acc1`` from ``<run>/csv/metrics.csv``;
MACs are the run's last ``model/gmacs`` (logged again when testing starts: the cost of the checkpoint scored).
Wall time is the subprocess's wall clock, start-up included, so the times need a quiet machine: wrap the
command in ``flock /tmp/accel-cpu.lock`` where other jobs share the CPUs.

Writes ``<out-dir>/digits_table.csv`` (one line per run; rows of an earlier invocation into the same
directory are kept, so ``--only`` can rerun a failed row after its directory is deleted), the markdown
table (printed and in ``digits_table.md``) and each run's console in ``<out-dir>/<row>.log``. A failed run
is reported in its row (exit code, last line of its console) and the others go on; the script then exits 1.
A row whose directory already holds a run is refused before anything runs (train.py would continue it).
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from accel.errors import UserInputError, run_cli  # noqa: E402

BASELINE = "baseline"
LAST = "{baseline_last}"   # placeholders in overrides, filled in once the baseline has run
BEST = "{baseline_best}"
SHELF = ("train=false", f"ckpt_path={BEST}")
COLUMNS = ["row", "method", "kind", "command", "val_top1", "wall_s", "wall_x_baseline", "gmacs", "exit_code",
           "run_dir", "start_checkpoint", "error"]


@dataclass(frozen=True)
class Row:
    name: str                      # --only name and run directory
    method: str                    # the table's method column
    overrides: Tuple[str, ...]
    of: str = ""                   # an off-the-shelf row: the trained row whose method it evaluates

    @property
    def kind(self) -> str:
        if SHELF[0] in self.overrides:
            return "off the shelf"
        return "fine-tuned" if any(LAST in o for o in self.overrides) else "trained"

    @property
    def metric(self) -> str:
        return "eval/val_acc1" if self.kind == "off the shelf" else "best/val_acc1"

    @property
    def needs_baseline(self) -> bool:
        return any(LAST in o or BEST in o for o in self.overrides)


def trained(name: str, method: str, *overrides: str) -> Row:
    return Row(name, method, tuple(overrides))


def shelf(of: Row, method: str = "", *extra: str) -> Row:
    """``of`` evaluated on the baseline's best checkpoint, configured as in its row."""
    return Row(f"{of.name}_shelf", method or of.method, (*of.overrides, *extra, *SHELF), of=of.name)


EVIT = trained("evit", "EViT kr 0.7", "experiment=evit_digits")
TOPK = trained("topk", "Top-K kr 0.7", "experiment=topk_digits")
KMEDOIDS = trained("kmedoids", "K-Medoids kr 0.7", "experiment=kmedoids_digits")
DPCKNN = trained("dpcknn", "DPC-KNN kr 0.7", "experiment=dpcknn_digits")
ATS = trained("ats", "ATS (blocks 1–5)", "experiment=ats_digits")
ROWS: List[Row] = [
    trained(BASELINE, "none (baseline)"),
    EVIT, TOPK, KMEDOIDS, DPCKNN,
    trained("patchmerger", "PatchMerger kr 0.7", "experiment=patchmerger_digits"),
    ATS,
    trained("diffrate", "DiffRate (search, 50 % FLOPs)", "experiment=diffrate_digits", "keep_rate=0.5"),
    trained("dynamicvit", "DynamicViT (fine-tunes the baseline)", "experiment=dynamicvit_digits",
            f"model.pretrained_path={LAST}"),
    shelf(EVIT), shelf(TOPK), shelf(KMEDOIDS),
    # The learned score layers need training; their ablation with plain averages has no parameters.
    shelf(DPCKNN, "DPC-KNN kr 0.7", "reducer.equal_weight=true"),
    shelf(ATS),
    # ToMe has no digits experiment: r = 2 per block (16 → 4 image tokens over 6 blocks) costs about the
    # MACs of Top-K and K-Medoids at keep rate 0.7 (29 vs 31 and 30 MMACs per image; the baseline 46).
    Row("tome_shelf", "ToMe r 2", ("reducer=tome", "reducer.r=2", *SHELF)),
]
BY_NAME = {r.name: r for r in ROWS}


def baseline_checkpoints(out_dir: str) -> Optional[Dict[str, str]]:
    """The baseline run's ``last`` and ``best`` checkpoints (its one epoch_*.ckpt, model_checkpoint.save_top_k:
    1), None where it holds no such pair (not run, or failed)."""
    folder = os.path.join(out_dir, BASELINE, "checkpoints")
    last, best = os.path.join(folder, "last.ckpt"), glob.glob(os.path.join(folder, "epoch_*.ckpt"))
    return {LAST: last, BEST: best[0]} if os.path.isfile(last) and len(best) == 1 else None


def missing_baseline(out_dir: str) -> str:
    return (f"{os.path.join(out_dir, BASELINE, 'checkpoints')} holds no last.ckpt and single best epoch_*.ckpt "
            "to start from")


def fill(overrides: Sequence[str], checkpoints: Dict[str, str]) -> List[str]:
    out = []
    for o in overrides:
        for key, path in checkpoints.items():
            o = o.replace(key, path)
        out.append(o)
    return out


def shown(row: Row) -> str:
    """The row's overrides as the table shows them, checkpoints named by what they are."""
    return " ".join(fill(row.overrides, {LAST: "<baseline>/checkpoints/last.ckpt",
                                         BEST: "<baseline>/checkpoints/<best>.ckpt"})) or "(the default)"


def read_metric(run_dir: str, key: str) -> Optional[float]:
    """The last value of ``key`` in the run's CSV log, None when it was not logged."""
    path = os.path.join(run_dir, "csv", "metrics.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as f:
        values = [r[key] for r in csv.DictReader(f) if r.get(key)]
    return float(values[-1]) if values else None


def last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""


def run_row(row: Row, out_dir: str, extra: Sequence[str], checkpoints: Dict[str, str]) -> Dict[str, str]:
    """Run one row's train.py to the end; its CSV line."""
    run_dir = os.path.join(out_dir, row.name)
    argv = [sys.executable, "train.py", *fill(row.overrides, checkpoints), *extra, f"hydra.run.dir={run_dir}"]
    result = {"row": row.name, "method": row.method, "kind": row.kind, "command": shown(row), "run_dir": run_dir,
              "start_checkpoint": next((checkpoints[k] for k in (LAST, BEST) if any(k in o for o in row.overrides)),
                                       "")}
    log_path = os.path.join(out_dir, f"{row.name}.log")
    print(f"[{row.name}] {shlex.join(argv[1:])}  (console: {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    result["wall_s"] = f"{time.perf_counter() - start:.1f}"
    result["exit_code"] = str(code)
    acc, gmacs = read_metric(run_dir, row.metric), read_metric(run_dir, "model/gmacs")
    result["gmacs"] = "" if gmacs is None else f"{gmacs:.6f}"
    if code != 0:
        result["error"] = last_line(log_path)
    elif acc is None or not math.isfinite(acc):
        result["error"] = f"no finite {row.metric} in {run_dir}/csv/metrics.csv"
    else:
        result["val_top1"] = f"{acc:.6f}"
    print(f"[{row.name}] " + (f"failed: {result['error']}" if result.get("error") else
                              f"{100 * acc:.2f} % val top-1, {float(result['wall_s']):.0f} s"), flush=True)
    return result


def not_run(row: Row, out_dir: str, why: str) -> Dict[str, str]:
    return {"row": row.name, "method": row.method, "kind": row.kind, "command": shown(row),
            "run_dir": os.path.join(out_dir, row.name), "error": why}


def read_table(path: str) -> Dict[str, Dict[str, str]]:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def with_ratios(rows: Dict[str, Dict[str, str]]) -> List[Dict[str, str]]:
    """The rows in table order, each with its wall time as a multiple of the baseline's."""
    base = rows.get(BASELINE, {})
    base_s = float(base["wall_s"]) if base.get("wall_s") and base.get("val_top1") else None
    ordered = []
    for row in ROWS:
        if row.name in rows:
            r = {c: rows[row.name].get(c, "") for c in COLUMNS}
            r["wall_x_baseline"] = f"{float(r['wall_s']) / base_s:.2f}" if base_s and r["val_top1"] else ""
            ordered.append(r)
    return ordered


def accuracy(r: Optional[Dict[str, str]]) -> str:
    if r is None:
        return "—"
    if r.get("val_top1"):
        return f"{100 * float(r['val_top1']):.2f} %"
    return f"failed (exit {r['exit_code']})" if r.get("exit_code") else "not run (no baseline)"


def markdown(rows: List[Dict[str, str]]) -> str:
    """One line per method: its trained (or fine-tuned) run, and its off-the-shelf evaluation."""
    by_name = {r["row"]: r for r in rows}
    lines = ["| method | command (`python train.py …`) | val top-1 | wall time | × baseline | MMACs "
             "| off the shelf |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        if row.of or (row.name not in by_name and f"{row.name}_shelf" not in by_name):
            continue
        r, off = by_name.get(row.name), by_name.get(f"{row.name}_shelf")
        if row.kind == "off the shelf":    # a method with no trained row (ToMe)
            r, off = None, r
        command = f"`{shown(row)}`" if row.overrides else shown(row)
        cells = [row.method, command if r else "—", accuracy(r) if r else "—",
                 f"{float(r['wall_s']):.0f} s" if r and r.get("wall_s") else "—",
                 f"{r['wall_x_baseline']}" if r and r.get("wall_x_baseline") else "—",
                 f"{1e3 * float(r['gmacs']):.1f}" if r and r.get("gmacs") else "—",
                 accuracy(off) if off else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    shelves = [r for r in ROWS if r.kind == "off the shelf" and r.name in by_name]
    if shelves:
        lines.append("")
        lines.append("Off the shelf (no training, the baseline's best checkpoint): "
                     + "; ".join(f"{r.method}: `{shown(r)}`" for r in shelves) + ".")
    return "\n".join(lines)


def write_table(out_dir: str, rows: List[Dict[str, str]]) -> str:
    with open(os.path.join(out_dir, "digits_table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows)
    with open(os.path.join(out_dir, "digits_table.md"), "w") as f:
        f.write(text + "\n")
    return text


def selected(only: Optional[Sequence[str]]) -> List[Row]:
    if not only:
        return list(ROWS)
    unknown = [n for n in only if n not in BY_NAME]
    if unknown:
        raise UserInputError(f"--only {' '.join(unknown)} names no row; expected some of {', '.join(BY_NAME)}.")
    return [r for r in ROWS if r.name in only]


def check_can_run(rows: Sequence[Row], out_dir: str) -> None:
    """Refuse, before anything runs, rows whose directory holds a run and rows whose baseline is missing."""
    taken = [r.name for r in rows if os.path.exists(os.path.join(out_dir, r.name))]
    if taken:
        raise UserInputError(f"{out_dir} already holds the run(s) {', '.join(taken)}; expected new rows: delete "
                             "those directories to run them again, or pass another --out-dir.")
    dependent = [r.name for r in rows if r.needs_baseline]
    if dependent and BASELINE not in {r.name for r in rows} and baseline_checkpoints(out_dir) is None:
        raise UserInputError(f"{', '.join(dependent)} start(s) from the trained baseline, but "
                             f"{missing_baseline(out_dir)}; expected baseline in --only, or a baseline run in "
                             "this --out-dir.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "logs", "digits_table"))
    p.add_argument("--only", nargs="+", metavar="ROW", help=f"rows to run: {', '.join(BY_NAME)}")
    p.add_argument("--extra", default="", help="overrides added to every run (e.g. to shrink them for a test)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args = p.parse_args(argv)
    out_dir, extra, rows = os.path.abspath(args.out_dir), shlex.split(args.extra), selected(args.only)

    if args.dry_run:
        paths = {LAST: os.path.join(out_dir, BASELINE, "checkpoints", "last.ckpt"),
                 BEST: os.path.join(out_dir, BASELINE, "checkpoints", "<best epoch_*.ckpt>")}
        for row in rows:
            run_dir = os.path.join(out_dir, row.name)
            command = shlex.join([*fill(row.overrides, paths), *extra, f"hydra.run.dir={run_dir}"])
            print(f"{row.name}: python train.py {command}")
        return 0
    check_can_run(rows, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    table = read_table(os.path.join(out_dir, "digits_table.csv"))
    failed = False
    for row in rows:
        checkpoints: Optional[Dict[str, str]] = {}
        if row.needs_baseline:
            checkpoints = baseline_checkpoints(out_dir)
            if checkpoints is None:   # the baseline failed in this invocation: the row cannot start
                table[row.name], failed = not_run(row, out_dir, f"not run: {missing_baseline(out_dir)}"), True
                print(f"[{row.name}] {table[row.name]['error']}", flush=True)
                continue
        table[row.name] = run_row(row, out_dir, extra, checkpoints)
        failed |= not table[row.name].get("val_top1")
        write_table(out_dir, with_ratios(table))   # after every row: an interrupted table keeps what ran
    print(write_table(out_dir, with_ratios(table)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
