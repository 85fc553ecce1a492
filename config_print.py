"""What a run says about its config at start: the config groups chosen and the values set on the command
line, in a few lines, and where the full resolved tree is (``config_tree.log`` in the run directory)."""
from __future__ import annotations

import os
import shutil
import textwrap
from typing import List, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

TREE_ORDER = ("data", "model", "reducer", "module", "callbacks", "logger", "trainer", "paths", "extras")
GROUP_ORDER = ("experiment", "model", "reducer", "data", "trainer", "module", "callbacks", "logger", "hparams_search",
               "debug")


def config_tree(cfg: DictConfig) -> Tree:
    """The resolved config (without Hydra's node) as a Rich tree, top-level keys in TREE_ORDER."""
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER and k != "hydra"]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(key, style="bold").add(Syntax(text, "yaml"))
    return tree


def chosen_groups(cfg: DictConfig) -> List[str]:
    """``group=option`` for each config group the run composed (Hydra's own groups left out), the
    groups that say what is trained first."""
    if not HydraConfig.initialized():
        return []
    choices = {g: o for g, o in HydraConfig.get().runtime.choices.items() if o is not None and not g.startswith("hydra")}
    order = [g for g in GROUP_ORDER if g in choices] + [g for g in choices if g not in GROUP_ORDER]
    return [f"{group}={choices[group]}" for group in order]


def command_line_values(cfg: DictConfig) -> List[str]:
    """The command line's overrides of keys (not group choices), as typed: the values that differ
    from the defaults of the chosen groups."""
    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    overrides = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    return [o.input_line for o in overrides if o.key_or_group not in hc.runtime.choices]


def config_summary(cfg: DictConfig, tree_file: Optional[str]) -> str:
    """The few lines printed at start: groups, command-line values, and the file with the full tree."""
    width = min(shutil.get_terminal_size().columns, 120)
    lines = []
    for label, items in (("Config groups:", chosen_groups(cfg)), ("Command line: ", command_line_values(cfg))):
        if items:
            lines.append(textwrap.fill(" ".join(items), width, initial_indent=f"{label} ",
                                       subsequent_indent=" " * (len(label) + 1), break_on_hyphens=False))
    if tree_file:
        lines.append(f"Full config:   {tree_file}")
    return "\n".join(lines)


def print_config(cfg: DictConfig, save_dir: Optional[str] = None, name: str = "config_tree.log") -> None:
    """Save the resolved config tree as ``save_dir/name`` and print the summary that points to it."""
    path = None
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, name)
        with open(path, "w") as f:
            Console(file=f, width=120).print(config_tree(cfg))
    print(config_summary(cfg, path), flush=True)
