"""What ``train.py`` does, as functions tests can call: check the config, find the checkpoint to
resume from, build the objects from it, fit, then test the best checkpoint (or only evaluate a
checkpoint with ``train=false``)."""
from __future__ import annotations

import glob
import inspect
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import hydra
from hydra.errors import InstantiationException
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks.progress import ProgressBar

from accel.checkpoint import first_shape_mismatch, load_file
from accel.errors import UserInputError
from accel.reducers.base import check_keep_rate
from callbacks.resume_state import wandb_run_id
from config_print import print_config
from launch_checks import closest
from run_dirs import check_writable, continue_run, mark_finished, resume_index, write_resume_record

log = logging.getLogger(__name__)
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")

def newest_run_checkpoint(run_dir: str) -> Optional[str]:
    """The newest of ``checkpoints/last.ckpt`` (periodic or on SIGTERM) and Lightning's SLURM requeue
    checkpoints ``hpc_ckpt_<n>.ckpt`` in a run directory, or None."""
    found = glob.glob(os.path.join(run_dir, "checkpoints", "last.ckpt")) + glob.glob(os.path.join(run_dir, "hpc_ckpt_*.ckpt"))
    return max(found, key=os.path.getmtime, default=None)


def resolve_ckpt_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint to start from: ``ckpt_path`` as given; ``last`` → the newest checkpoint in this
    run's directory; unset while training → that one too if it exists (a requeued SLURM job re-runs in
    its own run directory), so a rerun never overwrites a run's checkpoints with a fresh start."""
    ckpt = cfg.get("ckpt_path")
    automatic = ckpt is None and cfg.get("train", True)
    if ckpt != "last" and not automatic:
        return ckpt
    run_dir = cfg.paths.output_dir
    found = newest_run_checkpoint(run_dir)
    if ckpt == "last" and found is None:
        raise UserInputError(f"ckpt_path=last found no checkpoints/last.ckpt or hpc_ckpt_*.ckpt in the run directory "
                             f"{run_dir}; expected hydra.run.dir=<the run to resume> (or ckpt_path=<file.ckpt>).")
    if found and ckpt is None:
        log.info("Resuming from %s, found in the run directory.", found)
    return found


def check_devices(trainer: DictConfig) -> None:
    """GPUs asked for per node must be visible. CPU processes are not limited: Lightning runs as many
    as asked (trainer=ddp_sim runs 2 on any machine), and over-subscribing cores is a choice."""
    devices, accelerator = trainer.get("devices", "auto"), trainer.get("accelerator", "auto")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    visible = torch.cuda.device_count() if uses_gpu else 0
    if uses_gpu and visible == 0:
        chosen = f"trainer={group_choice('trainer')}" if group_choice("trainer") else f"trainer.accelerator={accelerator}"
        raise UserInputError(f"{chosen} trains on GPUs, but this machine has no GPU that PyTorch can use; use "
                             "trainer=cpu (or trainer.accelerator=auto, which takes a GPU where there is one).")
    if uses_gpu and isinstance(devices, int) and devices > visible:
        raise UserInputError(f"trainer.devices={devices} but this node has {visible} visible GPU(s); expected at most "
                             f"{visible} (trainer.devices counts GPUs per node; add nodes with trainer.num_nodes).")


def group_choice(group: str) -> Optional[str]:
    """The option of a config group this run chose (``trainer`` → ``gpu``), None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def check_batch_size(data: DictConfig) -> None:
    """A batch size is a positive number of images (a negative one would first surface as a negative
    learning rate, which the LR scaling derives from it)."""
    size = data.get("batch_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserInputError(f"data.batch_size={size} is not a number of images; expected a positive integer, the "
                             "images per process and step (e.g. data.batch_size=64).")


def keep_rate_is_used(cfg: DictConfig) -> bool:
    """Whether a node other than the top-level ``keep_rate`` reads it (a reducer, Evo-LeViT's model, a
    keep-rate schedule)."""
    container = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "keep_rate")]),
                                       resolve=False)
    return "${keep_rate}" in repr(container)


def models_with_a_reducer(conf_dir: str = CONF_DIR) -> List[str]:
    """The model configs (conf/model/<name>.yaml) that choose a token reducer, directly or through the
    file they build on; parameterised files without a name of their own are left out."""
    folder = os.path.join(conf_dir, "model")
    files = {f[:-5]: OmegaConf.load(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".yaml")}

    def reduces(name: str) -> bool:
        for entry in files[name].get("defaults") or []:
            if isinstance(entry, str) and entry in files and reduces(entry):
                return True
            if isinstance(entry, DictConfig) and any("reducer" in k and v != "none" for k, v in entry.items()):
                return True
        return False
    return sorted(n for n, f in files.items() if reduces(n) and not OmegaConf.is_missing(f, "name"))


def reducer_options(conf_dir: str = CONF_DIR) -> List[str]:
    """The reducer group's options that wrap a backbone in a reducer (conf/reducer/<name>.yaml with a
    ``_target_``, at the top or under ``reducer`` for the files placed at the top level)."""
    folder = os.path.join(conf_dir, "reducer")
    names = []
    for f in sorted(os.listdir(folder)):
        node = OmegaConf.load(os.path.join(folder, f)) if f.endswith(".yaml") else None
        if node is not None and ("_target_" in node or isinstance(node.get("reducer"), DictConfig)):
            names.append(f[:-5])
    return names


def warn_unused_keep_rate(cfg: DictConfig) -> None:
    """keep_rate < 1 with nothing that reads it trains the full model: say so, once (rank 0)."""
    keep_rate = cfg.get("keep_rate", 1.0)
    if keep_rate == 1.0 or keep_rate is None or keep_rate_is_used(cfg) or rank_zero_only.rank != 0:
        return
    model = group_choice("model") or "the configured model"
    log.warning("keep_rate=%s has no effect: model=%s reduces no tokens (no reducer); the model configs with a "
                "reducer are %s, or add one to a DeiT with reducer=%s.", keep_rate, model,
                ", ".join(models_with_a_reducer()), "|".join(reducer_options()))


def check_config(cfg: DictConfig, ckpt: Optional[str] = None) -> None:
    """Reject values a user can get wrong before anything is built or written (``ckpt``: the
    resolved checkpoint path, see resolve_ckpt_path)."""
    # Hydra's own node is left out: composed for a single run (tests, compose API) its hydra.sweep.subdir
    # interpolates the unset hydra.job.num, which would raise here instead of being reported.
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    if missing:
        example = " (e.g. data.root=/datasets/imagenet)" if missing[0] == "data.root" else ""
        raise UserInputError(f"{missing[0]} is required and not set; add {missing[0]}=<value> to the command "
                             f"line{example}.")
    check_keep_rate(cfg.get("keep_rate", 1.0))
    check_batch_size(cfg.data)
    check_devices(cfg.trainer)
    warn_unused_keep_rate(cfg)
    if ckpt and not os.path.isfile(ckpt):
        raise UserInputError(f"ckpt_path={ckpt!r} does not exist; expected a .ckpt file written by this project "
                             "(e.g. logs/train/runs/<date>/checkpoints/last.ckpt).")
    if not cfg.get("train", True) and not ckpt:
        raise UserInputError("train=false needs ckpt_path=<file.ckpt> to evaluate; none was given.")


def resolved_without_hydra(cfg: DictConfig) -> Dict[str, Any]:
    """The run's config as plain containers (for loggers), without Hydra's own node."""
    return {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
            for k, v in cfg.items() if k != "hydra"}


def instantiate_list(section: Optional[DictConfig]) -> List[Any]:
    """Instantiate every entry with a ``_target_`` (callbacks, loggers)."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if isinstance(c, DictConfig) and "_target_" in c]


def check_checkpoint_fits(path: str, module: pl.LightningModule, ckpt: Optional[Dict[str, Any]] = None) -> None:
    """Name the file and the first mismatched tensor when a checkpoint is for another model."""
    ckpt = load_file(path) if ckpt is None else ckpt
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
        unknown = unknown_parameter(exc, node)
        if unknown:
            raise UserInputError(unknown) from None
        raise


def unknown_parameter(exc: InstantiationException, node: DictConfig) -> Optional[str]:
    """The sentence for a key its target does not take (``+trainer.max_epoch=1``: Trainer's TypeError
    about an unexpected keyword argument), naming the closest parameter; None for other errors."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(exc.__cause__ or exc))
    where = re.search(r"full_key: (\S+)", str(exc))
    if not found:
        return None
    full_key = where.group(1) if where else node._get_full_key(None)
    target_node = OmegaConf.select(node._get_root(), full_key) if full_key else node
    target = str(target_node.get("_target_", "")) if isinstance(target_node, DictConfig) else ""
    try:
        parameters = list(inspect.signature(hydra.utils.get_object(target)).parameters)
    except Exception:
        parameters = []
    key = f"{full_key}.{found.group(1)}" if full_key else found.group(1)
    close = closest(found.group(1), parameters)
    hint = f"did you mean {full_key}.{close}?" if close else f"its parameters are {', '.join(parameters)}."
    return f"{key} is not a parameter of {target}; {hint}"


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


def sweep_group_and_job() -> Tuple[Optional[str], Optional[str]]:
    """In a multirun: the sweep directory's name (a W&B group) and ``<job num>:<overrides>`` (a W&B
    run name); outside one, (None, None)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, None
    hc = HydraConfig.get()
    return os.path.basename(os.path.normpath(hc.sweep.dir)), f"{hc.job.num}:{hc.job.override_dirname}".rstrip(":")


def prepare_loggers(cfg: DictConfig, ckpt: Optional[Dict[str, Any]]) -> None:
    """Logger settings that depend on the run: W&B group/name per sweep job and, on resume, the saved
    W&B run id (``resume="allow"``); a CSV log already in the run directory is kept by writing the
    resumed part beside it (``csv/resume_<k>/``), as Lightning's CSVLogger deletes an existing file."""
    loggers = cfg.get("logger") or {}
    with open_dict(cfg):
        if loggers.get("wandb") is not None:
            wandb = loggers.wandb
            group, job = sweep_group_and_job()
            if group and not wandb.get("group"):
                wandb.group, wandb.name = group, wandb.get("name") or job
            run_id = wandb_run_id(ckpt) if ckpt else None
            if run_id:
                wandb.id, wandb.resume = run_id, "allow"
        csv = loggers.get("csv")
        if ckpt is not None and csv is not None:
            base = os.path.join(str(csv.save_dir), str(csv.name or ""))
            k = 0
            while os.path.isfile(os.path.join(base, str(csv.version) if k == 0 else f"resume_{k}", "metrics.csv")):
                k += 1
            if k:
                csv.version = f"resume_{k}"


def output_directories(trainer: pl.Trainer) -> Dict[str, str]:
    """The directories a run writes to, each with what it holds (checkpoints, logs) and for whom."""
    dirs = {str(lg.save_dir): f"log directory of {type(lg).__name__}"
            for lg in trainer.loggers if getattr(lg, "save_dir", None)}
    dirs.update({str(cb.dirpath): f"checkpoint directory of {type(cb).__name__}"
                 for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
    return dirs


def run(cfg: DictConfig) -> Dict[str, float]:
    """Fit and/or test as the config says; return the metrics logged by the last stage. A launch into
    a directory that holds a run continues that run with its saved config (run_dirs.continue_run)."""
    ckpt_path = resolve_ckpt_path(cfg)
    changes = continue_run(cfg, ckpt_path)
    check_config(cfg, ckpt_path)
    run_dir = str(cfg.paths.output_dir)
    index = resume_index(run_dir)
    ckpt = load_file(ckpt_path) if ckpt_path else None
    prepare_loggers(cfg, ckpt)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    check_writable(output_directories(trainer))
    if trainer.global_rank == 0:
        print_config(cfg, run_dir, f"config_tree_resume_{index}.log" if index else "config_tree.log")
    for lg in trainer.loggers:
        lg.log_hyperparams(resolved_without_hydra(cfg))
    if ckpt_path:
        check_checkpoint_fits(ckpt_path, module, ckpt)
        del ckpt  # Lightning loads it again where it restores the training state
    if changes is not None and trainer.global_rank == 0:
        write_resume_record(cfg, run_dir, changes)

    metrics: Dict[str, float] = {}
    if cfg.get("train", True):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except FloatingPointError as exc:  # the loss or the weights diverged: its message says what to change
            raise UserInputError(str(exc)) from None
        if trainer.is_global_zero and not trainer.interrupted:  # a stop by signal or error does not return here
            mark_finished(run_dir, trainer.global_step, trainer.current_epoch)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", True):
        if cfg.get("train", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            test_ckpt = best or None
            if not best:
                log.warning("No best checkpoint was saved; testing the current weights.")
            # The test split is the validation split: the names say so, and which weights were scored.
            module.set_test_prefix("best/val" if best else "last/val")
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
