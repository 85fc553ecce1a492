"""What ``train.py`` does, as functions tests can call: check the config, build the objects from
it, fit, then test the best checkpoint (or only evaluate a checkpoint with ``train=false``)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import hydra
from hydra.errors import InstantiationException
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks.progress import ProgressBar
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from accel.checkpoint import first_shape_mismatch, load_file
from accel.errors import UserInputError
from accel.reducers.base import check_keep_rate

log = logging.getLogger(__name__)

TREE_ORDER = ("data", "model", "reducer", "module", "callbacks", "logger", "trainer", "paths", "extras")


def check_config(cfg: DictConfig) -> None:
    """Reject values a user can get wrong before anything is built or written."""
    check_keep_rate(cfg.get("keep_rate", 1.0))
    ckpt = cfg.get("ckpt_path")
    if ckpt and not os.path.isfile(ckpt):
        raise UserInputError(f"ckpt_path={ckpt!r} does not exist; expected a .ckpt file written by this project "
                             "(e.g. logs/train/runs/<date>/checkpoints/last.ckpt).")
    if not cfg.get("train", True) and not ckpt:
        raise UserInputError("train=false needs ckpt_path=<file.ckpt> to evaluate; none was given.")


def print_config_tree(cfg: DictConfig, save_dir: Optional[str] = None) -> None:
    """Print the resolved config as a Rich tree and save it as config_tree.log in ``save_dir``."""
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER and k != "hydra"]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(key, style="bold").add(Syntax(text, "yaml"))
    Console().print(tree)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, "config_tree.log"), "w") as f:
            Console(file=f, width=120).print(tree)


def resolved_without_hydra(cfg: DictConfig) -> Dict[str, Any]:
    """The run's config as plain containers (for loggers), without Hydra's own node."""
    return {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
            for k, v in cfg.items() if k != "hydra"}


def instantiate_list(section: Optional[DictConfig]) -> List[Any]:
    """Instantiate every entry with a ``_target_`` (callbacks, loggers)."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if isinstance(c, DictConfig) and "_target_" in c]


def check_checkpoint_fits(path: str, module: pl.LightningModule) -> None:
    """Name the file and the first mismatched tensor when a checkpoint is for another model."""
    ckpt = load_file(path)
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if sd is None:
        raise UserInputError(f"ckpt_path={path!r} is not a Lightning checkpoint (no 'state_dict'); "
                             "for plain weights use model.pretrained_path.")
    model_sd = module.state_dict()
    mismatch = first_shape_mismatch(sd, model_sd)
    missing = [k for k in model_sd if k not in sd]
    if mismatch or missing:
        what = mismatch or f"{missing[0]} is missing from the file"
        raise UserInputError(f"ckpt_path={path!r} does not fit the configured model: {what}.")


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with plain dicts/lists for nested config (so checkpoints hold no
    OmegaConf objects and load with ``weights_only=True``), letting a UserInputError through
    unwrapped so that the user sees its one sentence rather than Hydra's exception around it."""
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build(cfg: DictConfig) -> Tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Data module, LightningModule and Trainer (with its callbacks and loggers) from the config."""
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    callbacks = instantiate_list(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):
        # trainer.enable_progress_bar=false switches the configured progress bar off too.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = instantiate_list(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def run(cfg: DictConfig) -> Dict[str, float]:
    """Fit and/or test as the config says; return the metrics logged by the last stage."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    if trainer.global_rank == 0:
        print_config_tree(cfg, cfg.paths.output_dir)
    for lg in trainer.loggers:
        lg.log_hyperparams(resolved_without_hydra(cfg))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        check_checkpoint_fits(ckpt_path, module)

    metrics: Dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", True):
        if cfg.get("train", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            test_ckpt = best or None
            if not best:
                log.warning("No best checkpoint was saved; testing the current weights.")
        else:
            test_ckpt = ckpt_path
        trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    finish_wandb(trainer)
    return metrics


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close the W&B run, so that the next job of a multirun starts its own run."""
    from pytorch_lightning.loggers import WandbLogger
    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb
        wandb.finish()


def optimized_metric(cfg: DictConfig, metrics: Dict[str, float]) -> Optional[float]:
    """The value Hydra sweepers optimise (``cfg.optimized_metric``)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%r was not logged (logged: %s); returning None.", name, sorted(metrics))
        return None
    return metrics[name]
