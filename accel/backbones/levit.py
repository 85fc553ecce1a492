"""LeViT (Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference",
ICCV 2021) through timm's implementation: conv stem, attention biases instead of position
embeddings, Linear/Conv + BatchNorm pairs, shrinking attention between stages, Hardswish, no [CLS]
token, class + distillation heads (averaged at evaluation).

``fuse_levit`` folds every BatchNorm into the Linear/Conv beside it (Sec. 4.2: "batch
normalization ... can be merged with the preceding linear layer at inference"), heads included."""
from __future__ import annotations

import copy
import logging
from typing import Optional

import timm
from timm.models.levit import ConvNorm, Levit, LinearNorm, NormLinear, checkpoint_filter_fn
from torch import nn

from accel.backbones.levit_names import is_official_levit, official_to_timm
from accel.checkpoint import load_into
from accel.errors import UserInputError

log = logging.getLogger(__name__)

FUSABLE = (ConvNorm, LinearNorm, NormLinear)


def create_levit(name: str, num_classes: int = 1000, img_size: int = 224, distilled: bool = True,
                 drop_path_rate: float = 0.0, pretrained_path: Optional[str] = None) -> Levit:
    """A timm LeViT by ``name`` (``levit_128s`` … ``levit_384``), with the distillation head when
    ``distilled``; ``pretrained_path`` loads a local file in timm's or the official release's naming.

    The attention-bias tables are sized for the stage resolutions, so the image size must be a
    multiple of 16, and a checkpoint only loads at the size it was trained for (a mismatch names the
    first table that differs) — the tables are not interpolated."""
    if not name.startswith("levit") or not timm.is_model(name):
        raise UserInputError(f"Unknown LeViT model {name!r}; expected one of {timm.list_models('levit_*')[:6]}.")
    if img_size % 16:
        raise UserInputError(f"LeViT img_size={img_size} is not a multiple of 16 (its stem has stride 16); "
                             "expected e.g. 224.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size,
                              distilled=distilled, drop_path_rate=drop_path_rate)
    if pretrained_path:
        missing = load_into(model, pretrained_path, filter_fn=_filter, droppable=("head.", "head_dist."))
        clear_attention_bias_cache(model)
        if missing:
            log.warning("Loaded %s; re-initialised %s (class count differs).", pretrained_path, ", ".join(missing))
    return model


def _filter(sd, model):
    """Official release names (``patch_embed.0.c.weight``, …) are mapped to timm's first."""
    if is_official_levit(sd):
        sd = official_to_timm(sd, model.state_dict().keys())
    return checkpoint_filter_fn(sd, model)


def clear_attention_bias_cache(model: nn.Module) -> None:
    """Drop the eval-mode attention-bias caches, so that biases loaded after ``.eval()`` are used."""
    for m in model.modules():
        if hasattr(m, "attention_bias_cache"):
            m.attention_bias_cache = {}


def _fuse(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, FUSABLE):
            setattr(module, name, child.fuse())
        else:
            _fuse(child)


def fuse_levit(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm folded into its Linear/Conv (logits
    equal to the unfused model's within 1e-5); the original is left as it was."""
    if not any(isinstance(m, FUSABLE) for m in model.modules()):
        raise UserInputError(f"{type(model).__name__} has no Linear/Conv + BatchNorm pairs to fuse; expected a LeViT.")
    fused = copy.deepcopy(model).eval()
    _fuse(fused)
    clear_attention_bias_cache(fused)
    return fused
