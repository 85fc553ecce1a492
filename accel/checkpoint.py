"""Load local checkpoint files into timm models: timm format, the DeiT release format
(``{'model': ...}``) and this project's Lightning checkpoints (``{'state_dict': {'net.…'}}``)."""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from accel.errors import UserInputError

StateDict = Dict[str, torch.Tensor]


def load_file(path: str):
    """The object saved in ``path`` (on the CPU), or one sentence if it is missing or unreadable."""
    if not path or not os.path.isfile(path):
        raise UserInputError(f"Checkpoint file {path!r} does not exist; expected a path to a .pth/.pt/.ckpt file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise UserInputError(f"Checkpoint file {path!r} could not be read by torch.load ({exc}).") from exc


def read_state_dict(path: str) -> StateDict:
    """The parameter tensors stored in ``path``, whatever wrapper the file uses."""
    obj = load_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        # A checkpoint of this project: keep the network, drop the EMA copy and metrics.
        if any(k.startswith("net.") for k in sd):
            sd = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
        return sd
    for key in ("model", "model_ema", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise UserInputError(f"Checkpoint file {path!r} holds no state dict; expected a dict of tensors, "
                         "or one under 'model', 'state_dict' or 'module'.")


def first_shape_mismatch(sd: StateDict, model_sd: StateDict) -> Optional[str]:
    """A sentence naming the first key whose shape differs between ``sd`` and the model, if any."""
    for k, v in sd.items():
        if k in model_sd and tuple(model_sd[k].shape) != tuple(v.shape):
            return f"{k} has shape {tuple(v.shape)} in the file but {tuple(model_sd[k].shape)} in the model"
    return None


def load_into(
    model: nn.Module,
    path: str,
    filter_fn: Optional[Callable[[StateDict, nn.Module], StateDict]] = None,
    droppable: Iterable[str] = ("head.", "head_dist."),
) -> list[str]:
    """Load ``path`` into ``model``; return the keys left at their initial values.

    ``filter_fn`` adapts the file to the model (timm's checkpoint filters resize position
    embeddings). Keys starting with a ``droppable`` prefix whose shape does not fit (a classifier
    for another class count) are dropped and re-initialised; any other mismatch is an error.
    """
    sd = read_state_dict(path)
    from accel.reducers.evo_checkpoint import evo_to_timm, is_evo_vit
    if is_evo_vit(sd):
        # Evo-ViT's own naming: the network loads into the timm ViT; its training-only auxiliary
        # [CLS] head belongs to the reducer and is left out here.
        sd = {k: v for k, v in evo_to_timm(sd).items() if not k.startswith("reducer.")}
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    model_sd = model.state_dict()
    droppable = tuple(droppable)
    dropped = [k for k, v in sd.items()
               if k.startswith(droppable) and k in model_sd and model_sd[k].shape != v.shape]
    for k in dropped:
        del sd[k]
    mismatch = first_shape_mismatch(sd, model_sd)
    if mismatch:
        raise UserInputError(f"Checkpoint {path!r} does not fit the model: {mismatch}.")
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    required_missing = [k for k in missing if not k.startswith(droppable)]
    if required_missing or unexpected:
        what = (f"missing {required_missing[0]!r}" if required_missing else f"unexpected {unexpected[0]!r}")
        raise UserInputError(f"Checkpoint {path!r} does not fit the model: {what} "
                             f"({len(required_missing)} missing, {len(unexpected)} unexpected keys).")
    model.load_state_dict(sd, strict=False)
    return missing
