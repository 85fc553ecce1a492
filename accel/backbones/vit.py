"""timm Vision Transformers (DeiT, ViT) built from a name, sized for the data, with local weights.

DeiT: Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021. The architectures are timm's; nothing is downloaded at run time.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import timm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from accel.checkpoint import load_into
from accel.errors import UserInputError

log = logging.getLogger(__name__)


def create_vit(
    name: str,
    num_classes: int = 1000,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    pretrained_path: Optional[str] = None,
    **overrides: Any,
) -> nn.Module:
    """A timm VisionTransformer by ``name`` (e.g. ``deit_small_patch16_224``).

    ``overrides`` go to the timm constructor (``patch_size``, ``embed_dim``, ``depth``, ...), so a
    small model for a CPU is a named DeiT with fewer/narrower blocks. ``pretrained_path`` loads a
    local file (timm or DeiT-release format): a head for another class count is re-initialised and
    the position embedding is interpolated to ``img_size``.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UserInputError(f"Unknown timm model {name!r}; expected a timm model name such as {close or 'deit_small_patch16_224'}.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size,
                              drop_path_rate=drop_path_rate, **overrides)
    if not isinstance(model, VisionTransformer):
        raise UserInputError(f"Model {name!r} is a {type(model).__name__}, expected a timm VisionTransformer.")
    if pretrained_path:
        reinit = load_into(model, pretrained_path, filter_fn=checkpoint_filter_fn)
        if reinit:
            log.warning("Loaded %s; re-initialised %s (class count differs).", pretrained_path, ", ".join(reinit))
        else:
            log.info("Loaded %s.", pretrained_path)
    return model
