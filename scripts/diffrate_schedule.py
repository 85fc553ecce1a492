"""Print the prune/merge schedule a DiffRate search found, as the overrides that evaluate or train with it.

    python scripts/diffrate_schedule.py logs/train/runs/<run>/checkpoints/last.ckpt

Reads the searched logits from the checkpoint (``reducer.search=true`` runs save them under ``reducer.``)
and prints the kept numbers per block ([CLS] included, as the authors' compression_rate.json), their
GFLOPs by the authors' formula, and the Hydra overrides of the fixed schedule."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accel.checkpoint import read_state_dict  # noqa: E402
from accel.errors import run_cli  # noqa: E402
from accel.reducers.diffrate import schedule_from_state_dict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint of a run with reducer=diffrate reducer.search=true")
    args = parser.parse_args()
    prune, merge, cost = schedule_from_state_dict(read_state_dict(args.ckpt))
    print(f"prune_kept_num: {prune}\nmerge_kept_num: {merge}\nGFLOPs: {cost:.4f}")
    as_list = lambda values: "[" + ",".join(str(v) for v in values) + "]"  # noqa: E731 (Hydra: no spaces)
    print(f"overrides: reducer.search=false reducer.schedule=null 'reducer.prune={as_list(prune)}' 'reducer.merge={as_list(merge)}'")


if __name__ == "__main__":
    run_cli(main)
