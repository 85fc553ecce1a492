"""Run directories that are never shared and never reused silently, and resumes that continue a run
as it was configured (README "Resume").

- ``${new_dir:<base>}`` (``hydra.run.dir``, ``hydra.sweep.dir``) claims a fresh directory with
  ``os.mkdir``, which is atomic also on shared file systems, so two launches in the same second get
  ``<base>`` and ``<base>_1``. Resolved once per launch (cached); Lightning's DDP workers are given
  the directory on their command line and claim nothing.
- ``${record_subdir:<run dir>}`` (``hydra.output_subdir``) is ``.hydra`` on a run's first launch and
  ``.hydra/resume_<k>`` on its k-th later launch, so Hydra never overwrites the run's own record.
- :func:`continue_run` gives a launch into a directory that holds a run (a resume, a requeued SLURM
  job, an evaluation) that run's saved config. Command-line overrides that change it are refused in
  one sentence unless listed in ``resume.allow``; a finished run, or one without a checkpoint, is
  not trained again on top of itself.
"""
from __future__ import annotations

import errno
import glob
import itertools
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from accel.errors import UserInputError, stop

RECORD = ".hydra"
FINISHED = "finished.yaml"
# Set by rank 0 when its launch continues a run, so that Lightning's DDP workers (started with the
# same command line) continue it too.
CONTINUES_ENV = "ACCEL_CONTINUES_RUN"
# Keys a resume may set without resume.allow: they say where things are, how the launch reports, or
# which checkpoint to start from, not what is trained.
NEUTRAL = ("ckpt_path", "resume", "train", "test", "paths", "logger", "tags", "optimized_metric",
           "data.num_workers", "trainer.enable_progress_bar", "callbacks.rich_progress_bar",
           "callbacks.model_summary")
_ABSENT = object()
# A command-line override that changes the run: (key, the run's value, the new value, the top-level node
# that a group choice replaces whole, "" where a group cannot be applied, None for a key).
Change = Tuple[str, str, str, Optional[str]]


def launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun's RANK, Lightning's DDP workers'
    LOCAL_RANK, SLURM_PROCID), 0 for a plain launch. Only rank 0 claims directories and writes records."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def new_dir(base: str) -> str:
    """Claim ``base`` (or ``base_1``, ``base_2``, ... when taken) as a new, empty directory."""
    if launch_rank() > 0:
        return base
    try:
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        for k in itertools.count():
            path = base if k == 0 else f"{base}_{k}"
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        # Raised while Hydra resolves its own node, where an exception becomes Hydra's traceback.
        stop(UserInputError(f"cannot create the run directory {base} ({exc.strerror}); expected a writable "
                            "paths.log_dir (or hydra.run.dir=<a writable directory>)."))
    raise AssertionError("unreachable")


def record_subdir(run_dir: str) -> Optional[str]:
    """``.hydra`` for a run's first launch, ``.hydra/resume_<k>`` (claimed) for its k-th later launch;
    None (no record) on ranks other than 0."""
    if launch_rank() > 0:
        return None
    os.makedirs(run_dir, exist_ok=True)
    try:
        os.mkdir(os.path.join(run_dir, RECORD))
        return RECORD
    except FileExistsError:
        pass
    for k in itertools.count(1):
        sub = os.path.join(RECORD, f"resume_{k}")
        try:
            os.mkdir(os.path.join(run_dir, sub))
            return sub
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


for _name, _fn in (("new_dir", new_dir), ("record_subdir", record_subdir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=True)


def launch_record() -> Optional[str]:
    """Where Hydra wrote this launch's record, relative to the run dir (``.hydra`` or
    ``.hydra/resume_<k>``); None outside a Hydra job or on other ranks."""
    if not HydraConfig.initialized():
        return None
    try:
        sub = HydraConfig.get().output_subdir
    except Exception:  # composed without a job (tests, compose API): hydra.runtime.output_dir is unset
        return None
    return str(sub) if sub is not None else None


def resume_index(run_dir: str) -> int:
    """0 for a run's first launch, k for its k-th later one (the suffix of its record)."""
    sub = launch_record()
    if sub is not None:
        return int(sub.rsplit("_", 1)[1]) if sub != RECORD else 0
    return len([n for n in os.listdir(run_dir) if n.startswith("config_tree")]) if os.path.isdir(run_dir) else 0


def _saved(run_dir: str, name: str) -> Any:
    path = os.path.join(run_dir, RECORD, name)
    return OmegaConf.load(path) if os.path.isfile(path) else None


def saved_config(run_dir: str) -> DictConfig:
    """The config the run last trained with: that of its newest resume that ran (its record holds
    ``changes.yaml``; a refused launch's record holds only what Hydra composed), else its first."""
    ran = [os.path.dirname(p) for p in glob.glob(os.path.join(run_dir, RECORD, "resume_*", "changes.yaml"))]
    newest = max(ran, key=lambda d: int(d.rsplit("_", 1)[1]), default=os.path.join(run_dir, RECORD))
    return OmegaConf.load(os.path.join(newest, "config.yaml"))


def continues_run(run_dir: str, has_checkpoint: bool) -> bool:
    """Whether this launch continues the run already recorded in ``run_dir``."""
    if not os.path.isfile(os.path.join(run_dir, RECORD, "config.yaml")):
        return False
    sub = launch_record()
    if sub is not None:  # rank 0 of a Hydra job: Hydra found the run's record and wrote beside it
        return sub != RECORD
    # Other ranks follow rank 0; without its word (SLURM tasks), a checkpoint says the run has begun.
    return os.environ.get(CONTINUES_ENV) == os.path.abspath(run_dir) or has_checkpoint


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT)
    except Exception:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:
            return OmegaConf.to_container(node, resolve=False)
    return node


def _is_neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "/") for n in NEUTRAL)


def _show(value: Any) -> str:
    if value is _ABSENT or value is None:
        return "unset" if value is _ABSENT else "null"
    return str(value).replace(" ", "")


def _launch_overrides() -> Tuple[List[str], Dict[str, Any]]:
    if not HydraConfig.initialized():
        return [], {}
    hc = HydraConfig.get()
    return list(hc.overrides.task), dict(hc.runtime.choices)


def run_changes(cfg: DictConfig, saved: DictConfig, saved_choices: Dict[str, Any],
                overrides: Iterable[str], choices: Dict[str, Any]) -> List[Change]:
    """The launch's command-line overrides that change the saved run, as (key, the run's value, the
    new value, top-level node to take whole from ``cfg`` or None for the key alone); neutral keys
    are included (they are always applied), marked by the caller."""
    changes = []
    # Each key once: its last override is the one Hydra applied, and the one compared here.
    for key in dict.fromkeys(ov.key_or_group for ov in OverridesParser.create().parse_overrides(list(overrides))):
        if key in choices:  # a config group choice (trainer=ddp)
            old, new = saved_choices.get(key, _ABSENT), choices.get(key)
            if _show(old) != _show(new):
                top = key.split("/")[0]
                changes.append((key, _show(old), _show(new), top if top in cfg and top in saved else ""))
            continue
        old, new = _value(saved, key), _value(cfg, key)
        if old != new or _is_neutral(key):
            changes.append((key, _show(old), _show(new), None))
    return changes


def continue_run(cfg: DictConfig, ckpt_path: Optional[str]) -> Optional[List[Change]]:
    """Give ``cfg`` the saved config of the run in ``paths.output_dir`` when this launch continues
    it, and return the deliberate changes (``resume.allow``) to record (write_resume_record); None
    when the launch starts a run. Refuses (UserInputError) changes not listed in ``resume.allow``, a
    finished run, and a run without a checkpoint to continue from."""
    run_dir = os.path.abspath(str(cfg.paths.output_dir))
    if not continues_run(run_dir, ckpt_path is not None):
        if launch_rank() == 0:
            os.environ.pop(CONTINUES_ENV, None)
        return None
    saved = saved_config(run_dir)
    hydra_saved = _saved(run_dir, "hydra.yaml")
    saved_choices = dict(hydra_saved.hydra.runtime.choices) if hydra_saved is not None else {}
    overrides, choices = _launch_overrides()
    allow = set((cfg.get("resume") or {}).get("allow") or [])
    changes = run_changes(cfg, saved, saved_choices, overrides, choices)
    deliberate = [c for c in changes if not _is_neutral(c[0])]
    if launch_rank() == 0:  # the others follow rank 0, which refuses for them
        refuse(run_dir, ckpt_path, [c for c in deliberate if c[0] not in allow], deliberate, cfg.get("train", True))
    apply_run_config(cfg, saved, changes)
    if launch_rank() == 0:
        os.environ[CONTINUES_ENV] = run_dir
    return deliberate


def refuse(run_dir: str, ckpt_path: Optional[str], refused: List[Change],
           deliberate: List[Change], training: bool) -> None:
    """One sentence for a launch that must not continue the run in ``run_dir`` (see continue_run)."""
    if refused:
        said = " and ".join(f"{k}={new}" for k, _, new, _ in refused)
        runs = " and ".join(old for _, old, _, _ in refused)
        keys = ",".join(k for k, _, _, _ in refused)
        verb = "differs" if len(refused) == 1 else "differ"
        raise UserInputError(f"resuming {run_dir} with {said}, which {verb} from the run's {runs}; resume without "
                             f"{'it' if len(refused) == 1 else 'them'} to continue the run as it was configured, or "
                             f"add resume.allow=[{keys}] to change it deliberately.")
    unappliable = [k for k, _, _, top in deliberate if top == ""]
    if unappliable:
        raise UserInputError(f"resuming {run_dir} with {unappliable[0]}=…, a config group that sets keys all over the "
                             "config, which a resume cannot change; start a new run (leave hydra.run.dir unset).")
    if training and ckpt_path is None and not os.environ.get("SLURM_RESTART_COUNT", "0").strip("0"):
        raise UserInputError(f"hydra.run.dir={run_dir} already holds a run ({RECORD}/config.yaml) and no checkpoint to "
                             "continue it from; leave hydra.run.dir unset for a new run directory, or remove "
                             f"{run_dir} to start that run over.")
    finished = os.path.join(run_dir, RECORD, FINISHED)
    if training and os.path.isfile(finished) and not deliberate:
        step = OmegaConf.load(finished).get("global_step")
        raise UserInputError(f"{run_dir} holds a finished run (trained to global step {step}); leave hydra.run.dir "
                             "unset for a new run, evaluate it with train=false ckpt_path=last, or train it further "
                             "deliberately, e.g. trainer.max_epochs=<more> resume.allow=[trainer.max_epochs].")


def apply_run_config(cfg: DictConfig, saved: DictConfig, changes: List[Change]) -> None:
    """Replace ``cfg`` (but its Hydra node) by the run's ``saved`` config, keeping this launch's neutral
    top-level nodes (paths, logger, ...) and its changes (a whole node for a group choice)."""
    current = {k: cfg[k] for k in cfg if k != "hydra"}
    with open_dict(cfg):
        for key in [k for k in cfg if k != "hydra" and k not in saved]:
            del cfg[key]
        for key in saved:
            cfg[key] = saved[key]
        for key in [k for k in NEUTRAL if "." not in k and k in current]:
            cfg[key] = current[key]
        for key, _, _, top in changes:
            if top:
                cfg[top] = current[top]
            elif key.split(".")[0] not in NEUTRAL:
                value = OmegaConf.select(OmegaConf.create(current), key, default=_ABSENT,
                                         throw_on_resolution_failure=False)
                if value is _ABSENT:  # ~key removed it
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(cfg, parent) if parent else cfg
                    if isinstance(node, DictConfig) and leaf in node:
                        del node[leaf]
                else:
                    OmegaConf.update(cfg, key, _raw(current, key), merge=False, force_add=True)


def _raw(current: Dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` without resolving interpolations (the run resolves them itself)."""
    top, _, rest = key.partition(".")
    node = current[top]
    for part in rest.split(".") if rest else []:
        node = node._get_node(part) if isinstance(node, DictConfig) else node[int(part)]
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)
    return node._value() if hasattr(node, "_value") else node


def write_resume_record(cfg: DictConfig, run_dir: str, deliberate: List[Change]) -> None:
    """In this launch's record (``.hydra/resume_<k>/``), once its checks passed: the config it runs with
    (Hydra wrote the one it composed from today's defaults) and the deliberate changes
    (``changes.yaml``, which marks the record as the config the run continues with next time)."""
    sub = launch_record()
    if sub is None or sub == RECORD:
        return
    folder = os.path.join(run_dir, sub)
    OmegaConf.save(OmegaConf.create({k: cfg[k] for k in cfg if k != "hydra"}), os.path.join(folder, "config.yaml"))
    OmegaConf.save(OmegaConf.create({k: {"run": old, "resume": new} for k, old, new, _ in deliberate}),
                   os.path.join(folder, "changes.yaml"))


def mark_finished(run_dir: str, global_step: int, epoch: int) -> None:
    """Record that the run's training finished, so that it is not trained again on top of itself."""
    folder = os.path.join(run_dir, RECORD)
    os.makedirs(folder, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"global_step": global_step, "epoch": epoch}), os.path.join(folder, FINISHED))


def check_writable(directories: Dict[str, str]) -> None:
    """Stop (UserInputError) when a directory (path → what it holds) cannot be written, or created
    where it does not exist yet, so that an unwritable checkpoint or log directory is found before
    training rather than at the first save. Probes with a temporary file and creates nothing."""
    for folder, what in directories.items():
        existing = os.path.abspath(folder)
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        try:
            if not os.path.isdir(existing):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise UserInputError(f"the {what} {folder} is not writable ({exc.strerror}); expected a directory this "
                                 "job can create and write to.") from None
