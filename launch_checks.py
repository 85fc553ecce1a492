"""The command line, checked before Hydra starts the job (``train.py``), where a mistake can still get
one sentence instead of Hydra's message or a traceback from deep inside a launcher:

- a chosen config that needs a Hydra plugin that is not installed (the pip package is named);
- a key, config group or group option that does not exist (the closest one is suggested, by
  difflib over the keys of the config the other overrides compose);
- a SLURM launcher on a machine without SLURM (``hydra/launcher=submitit_local`` is suggested);
- a ``paths.log_dir`` (or a ``hydra.run.dir`` / ``hydra.sweep.dir`` given) that cannot be written.

The check composes the config once with Hydra's compose API (about 0.1 s); it resolves nothing, so no
run directory is claimed."""
from __future__ import annotations

import difflib
import importlib
import os
import re
import shutil
from typing import Iterable, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from accel.errors import UserInputError
from run_dirs import check_writable

MULTIRUN_FLAGS = ("-m", "--multirun")


def check_command_line(argv: Sequence[str], conf_dir: str, config_name: str = "train.yaml") -> None:
    """Raise UserInputError for a command line (``sys.argv[1:]``) that Hydra would stop on with its own
    message or a traceback: see the module's docstring."""
    overrides = [a for a in argv if not a.startswith("-")]
    check_plugins(overrides, conf_dir)
    cfg = compose_or_explain(overrides, conf_dir, config_name)
    if cfg is None:  # another composition error: Hydra reports it with its own message
        return
    multirun = any(a in MULTIRUN_FLAGS for a in argv) or "hydra.mode=MULTIRUN" in overrides
    if multirun:
        check_launcher(cfg)
    check_output_dirs(cfg, overrides, multirun)


def check_plugins(overrides: Sequence[str], conf_dir: str) -> None:
    """Name the pip package when a chosen config (``hydra/launcher=submitit_slurm``,
    ``hparams_search=keep_rate_lr``) needs a Hydra plugin that is not installed; Hydra would otherwise
    stop on an unknown plugin class or config."""
    for arg in overrides:
        key, sep, choice = arg.lstrip("+~").partition("=")
        path = os.path.join(conf_dir, key.lstrip("/"), f"{choice}.yaml")
        if not sep or not os.path.isfile(path):
            continue
        with open(path) as f:
            modules = sorted(set(re.findall(r"hydra_plugins\.(\w+)", f.read())))
        for module in modules:
            try:
                importlib.import_module(f"hydra_plugins.{module}")
            except ImportError:
                package = module.replace("_", "-")
                raise UserInputError(f"{key}={choice} needs the Hydra plugin {package}, which is not installed; "
                                     f"install it with `pip install -r requirements.txt` (or pip install {package}).") from None


def single_point(overrides: Sequence[str]) -> List[str]:
    """The overrides of a sweep's first point (``keep_rate=0.5,0.7`` → ``keep_rate=0.5``); a sweep that
    cannot be enumerated (Optuna's ``interval(...)``) is left out."""
    point = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_sweep_override():
            point.append(override.input_line)
            continue
        try:
            first = next(iter(override.sweep_string_iterator()))
        except Exception:
            continue
        point.append(f"{override.get_key_element()}={first}")
    return point


def _compose(conf_dir: str, config_name: str, overrides: Sequence[str]) -> DictConfig:
    # The compose API runs before hydra.main and leaves no global state behind (the context restores it).
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def compose_or_explain(overrides: Sequence[str], conf_dir: str, config_name: str) -> Optional[DictConfig]:
    """The config of the command line's first point, or a UserInputError naming the override that does
    not exist with the closest existing one; None when composition fails for another reason."""
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app already (a test's compose): not here
        return None
    try:
        point = single_point(overrides)
        return _compose(conf_dir, config_name, point)
    except HydraException as exc:
        message = str(exc)
    except Exception:
        return None
    key = re.search(r"Could not override '([^']+)'", message)
    if key:
        unknown = key.group(1)
        given = next(o for o in point if re.sub(r"^[+~]+", "", o).split("=", 1)[0] == unknown)
        rest = [o for o in point if o is not given]
        raise UserInputError(unknown_key_sentence(unknown, given, _known_names(conf_dir, config_name, rest)))
    option = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if option:
        group, choice = option.groups()
        folder = os.path.join(conf_dir, group)
        names = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".yaml")) if os.path.isdir(folder) else []
        close = closest(choice, names)
        hint = f"did you mean {group}={close}?" if close else f"expected one of {', '.join(names)}."
        raise UserInputError(f"{group}={choice} is not a config of the {group} group (conf/{group}/); {hint}")
    return None


def _known_names(conf_dir: str, config_name: str, overrides: Sequence[str]) -> List[str]:
    """Every dotted key of the config that the command line's group choices compose (its other keys may
    be mistyped too), and the config groups (conf/ folders)."""
    groups = [os.path.relpath(root, conf_dir) for root, _, files in os.walk(conf_dir)
              if root != conf_dir and any(f.endswith(".yaml") for f in files)]
    choices = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in groups]
    try:
        cfg = _compose(conf_dir, config_name, choices)
    except Exception:
        cfg = OmegaConf.create()
    return list(dotted_keys(cfg)) + groups


def closest(name: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate most like ``name`` (difflib's ratio at least 0.6), or None."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def dotted_keys(node, prefix: str = "") -> Iterable[str]:
    """The dotted keys of a config, parents included, without resolving interpolations."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            yield path
            yield from dotted_keys(node._get_node(key), path + ".")
    elif isinstance(node, ListConfig):
        return


def unknown_key_sentence(key: str, given: str, known: Sequence[str]) -> str:
    """``trainer.max_epoch is not in the config; did you mean trainer.max_epochs?``"""
    # Compared within the same part of the config first: trainer.max_epoch is closest to trainer.max_epochs,
    # not to a key of the same name elsewhere. The key's own parents are no answer (modul.lr is not module).
    parent = key.rpartition(".")[0]
    known = [k for k in known if not key.startswith(k + ".") and k.count(".") == key.count(".")]
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = closest(key, siblings) or closest(key, known)
    value = given.split("=", 1)[1] if "=" in given else "…"
    if close:
        return f"{key} is not in the config; did you mean {close}={value}?"
    return (f"{key} is not in the config, and no key is close to it; `python train.py --cfg job` prints the keys "
            f"there are (+{key}={value} would add it, but only code that reads it would use it).")


def check_launcher(cfg: DictConfig) -> None:
    """A SLURM sweep needs SLURM where it is launched: submitit looks for ``srun``."""
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        raise UserInputError("hydra/launcher=submitit_slurm submits the sweep to SLURM, but this machine has no SLURM "
                             "(no srun on PATH); launch it from a SLURM login node, or run it on this machine with "
                             "hydra/launcher=submitit_local.")


def check_output_dirs(cfg: DictConfig, overrides: Sequence[str], multirun: bool) -> None:
    """The run (or sweep) directory given on the command line, else ``paths.log_dir`` that the run
    directories are made in, must be writable: Hydra creates the directory before the job starts."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    for override in overrides:
        name, _, value = override.partition("=")
        if name.lstrip("+") == key and value:
            if "${" not in value:
                check_writable({value: f"run directory ({key})"})
            return
    try:
        log_dir = OmegaConf.select(cfg, "paths.log_dir")
    except Exception:  # an interpolation only a running job resolves
        return
    if log_dir:
        check_writable({str(log_dir): "log directory (paths.log_dir)"})
