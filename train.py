"""Train (and test) an image classifier: ``python train.py model=evit_deit_s keep_rate=0.7``.

Hydra composes conf/train.yaml with the overrides; pipeline.run does the work."""
import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")

from accel.errors import run_cli  # noqa: E402
from launch_checks import check_command_line  # noqa: E402


def to_log_files(text: str) -> None:
    """Append ``text`` to the run's log files (train.log) only: the console gets it from Hydra or stop()."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig):
    from pipeline import optimized_metric, run
    # Inside the Hydra task: Hydra would print an escaping exception with its own traceback.
    return run_cli(lambda: optimized_metric(cfg, run(cfg)), log=to_log_files)


if __name__ == "__main__":
    # conf/hydra/launcher/submitit_*.yaml share their names with the plugin's schemas, so Hydra checks them
    # against those (wanted: typos fail) and warns that this matching is deprecated; both files set every
    # field themselves, so they stay valid when Hydra drops it.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
    # Before Hydra, which answers a mistyped key, a missing plugin or a missing SLURM with a message that does
    # not say what to type instead, or with a traceback.
    run_cli(lambda: check_command_line(sys.argv[1:], CONF_DIR))
    # Imported once the command line is checked (torch and Lightning take seconds to import), and before
    # Hydra configures logging: Lightning then keeps its own plain console handler for its messages.
    import pipeline  # noqa: F401
    main()
