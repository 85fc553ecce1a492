"""Several ``python train.py ...`` launches under one pair of DDP processes, for tests that run many
short ddp_sim launches (tests/test_recipes_ddp.py): each launch is train.py executed as a script
(as ``__main__``) with its own command line, but the interpreter, its imports and the gloo
process group are started once instead of once per launch (some 10 s of a 15 s launch here).

    ACCEL_TEST_LAUNCHES=plan.json PYTHONPATH=tests python tests/ddp_launches.py

``plan.json`` holds ``{"launches": [[arg, ...], ...], "signals": <folder>}``; every launch must set
``trainer=ddp_sim`` (2 processes) and ``hydra.run.dir``. The first launch starts the second process
exactly as a single launch does (Lightning re-runs this script with its DDP environment); that
process then runs the same launches in the same order. As with separate launches, it begins launch k
only once rank 0 has reached ``trainer.fit`` in it (rank 0 writes ``<signals>/<k>.at_fit``), after
rank 0 claimed or resumed the run directory. Each process writes ``=== launch <k> rank <r> rc <code>``
to stderr after each launch; the first launch that fails ends both processes (their later collectives
could not pair up), and rank 0 leaves ``<signals>/<k>.failed``."""
from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
PLAN_ENV = "ACCEL_TEST_LAUNCHES"
# Found anywhere in stderr, not only at a line start: other output of the two ranks may precede it.
LAUNCH_LINE = re.compile(r"=== launch (\d+) rank (\d+) rc (-?\d+|skipped)")
WAIT_S = 300


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def signal_rank0_at_fit(signals: str, current: list) -> None:
    """Make Lightning's launcher (called by trainer.fit and trainer.test) mark that rank 0 reached it
    in the current launch."""
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launch = _SubprocessScriptLauncher.launch

    def launch_and_signal(self, function, *args, **kwargs):
        if rank() == 0:
            open(os.path.join(signals, f"{current[0]}.at_fit"), "a").close()
        return launch(self, function, *args, **kwargs)

    _SubprocessScriptLauncher.launch = launch_and_signal


def wait_for(signals: str, k: int) -> bool:
    """Rank > 0: wait until rank 0 reached trainer.fit in launch ``k``; False if its launch failed."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(signals, f"{k}.at_fit")):
            return True
        if os.path.exists(os.path.join(signals, f"{k}.failed")):
            return False
        time.sleep(0.05)
    return False


def run_launch(args: list, extra: list) -> int:
    """``python train.py *args`` in this process; its exit code."""
    # sys.argv[0] stays this script (runpy.run_path would set it to train.py), so that Lightning's
    # launcher starts the second process as this script.
    sys.argv = [os.path.abspath(__file__), *args, *extra]
    try:
        with open(TRAIN) as f:
            exec(compile(f.read(), TRAIN, "exec"), {"__name__": "__main__", "__file__": TRAIN})
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then this process ends
        traceback.print_exc()
        return 1
    return 0


def report(k: int, me: int, code) -> None:
    """One ``=== launch`` line in a single write: both ranks share the pipe, and an unbuffered
    stderr (PYTHONUNBUFFERED) would otherwise write the text and its newline apart, so that the two
    ranks' lines could run together."""
    sys.stderr.flush()
    os.write(2, f"=== launch {k} rank {me} rc {code}\n".encode())


def main() -> None:
    # As `python train.py`: the repository root first on the path (this script's folder stays after it,
    # for the test-only callbacks).
    sys.path.insert(0, ROOT)
    plan = json.load(open(os.environ[PLAN_ENV]))
    launches, signals = plan["launches"], plan["signals"]
    os.makedirs(signals, exist_ok=True)
    me = rank()
    # What Lightning appended to this process's command line (rank > 0): the worker's Hydra job name
    # and no output subdir; the run directory is each launch's own.
    extra = [a for a in sys.argv[1 + len(launches[0]):] if not a.startswith("hydra.run.dir=")] if me else []
    current = [0]
    signal_rank0_at_fit(signals, current)
    for k, args in enumerate(launches):
        current[0] = k
        if me > 0 and k > 0 and not wait_for(signals, k):
            report(k, me, "skipped")
            os._exit(1)
        code = run_launch(args, extra)
        report(k, me, code)
        if code != 0:
            if me == 0:
                open(os.path.join(signals, f"{k}.failed"), "a").close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


if __name__ == "__main__":
    main()
