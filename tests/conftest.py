"""Shared fixtures: composed Hydra configs pointed at temporary directories, and small JPEG folders."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterable

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


@pytest.fixture(scope="session", autouse=True)
def shared_data_dir(tmp_path_factory):
    """One data directory for the whole session, so digits is written once."""
    path = str(tmp_path_factory.mktemp("data"))
    os.environ["ACCEL_DATA_DIR"] = path
    os.environ["PROJECT_ROOT"] = ROOT
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_SILENT"] = "true"
    return path


def make_cfg(out_dir, overrides: Iterable[str] = ()) -> DictConfig:
    """conf/train.yaml composed with ``overrides``, writing into ``out_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train.yaml", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir)
    return cfg


# Small, fast settings for runs on digits in tests.
QUIET = ["trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
         "data.num_workers=0"]
FAST = [*QUIET, "++model.depth=2", "++model.embed_dim=64", "++model.num_heads=2"]


def child_env(**extra) -> dict:
    """The environment for a child ``python train.py``: this one, without the address of a W&B service
    that an in-process W&B test started here (a child that joins it and is killed leaves its run ID
    registered there, and the resumed run is then refused as "in use")."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(extra)
    return env


def run_train(args, cwd=ROOT, timeout=600, env_extra=None) -> subprocess.CompletedProcess:
    """``python train.py *args`` as a user runs it; returns the finished process."""
    env = child_env(**(env_extra or {}))
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_jpeg_folder(root, classes=2, per_class=4, size=(96, 80), splits=("train", "val"), seed=0) -> str:
    """A tiny ImageNet-layout folder of real JPEG files with smooth random content."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize(size, Image.BICUBIC)
                img.save(os.path.join(folder, f"{i}.JPEG"), quality=90)
    return str(root)
