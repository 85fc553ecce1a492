"""Train (and test) an image classifier: ``python train.py model=evit_deit_s keep_rate=0.7``.

Hydra composes conf/train.yaml with the overrides; pipeline.run does the work."""
import os
import sys

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from accel.errors import UserInputError, one_line  # noqa: E402
from pipeline import optimized_metric, run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig):
    try:
        return optimized_metric(cfg, run(cfg))
    except UserInputError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
