"""Slide-PVTv2-B1/B2 (Pan et al., "Slide-Transformer", CVPR 2023, Sec. 4.1 and Table 1): PVTv2's
spatial-reduction attention replaced by slide attention in the early, high-resolution stages.

The paper reports these models but LeapLabTHU/Slide-Transformer ships no code for them, so this is
built the way the repository builds Slide-Swin: timm's ``pvt_v2_b1``/``pvt_v2_b2`` with a 3×3
:class:`SlideAttention` (deformed shifting included) in every block of the first ``slide_stages``
stages (2, as Slide-Swin's ``NUM_SLIDE_STAGES``); later stages keep PVTv2's attention. Dropping the
spatial-reduction convolutions of stages 1-2 gives 13,005,406 parameters and 2.29 GMACs for B1
(paper: 13.0M, 2.2G) and 23,606,475 / 4.34 GMACs for B2 (paper: 22.8M, 4.2G: its B2 differs in a
way the paper does not describe).
PVTv2 has no position embedding, so any image size works.
"""
from __future__ import annotations

from typing import List, Optional

import timm
import torch
from torch import nn

from accel.backbones.slide_attention import SlideAttention
from accel.checkpoint import load_into
from accel.errors import UserInputError

VARIANTS = {"slide_pvt_v2_b1": "pvt_v2_b1", "slide_pvt_v2_b2": "pvt_v2_b2"}


class SlideTokenAttention(SlideAttention):
    """Slide attention with PVTv2's attention signature: tokens [B, N, C] plus the map size."""

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        return super().forward(x.view(B, H, W, C)).reshape(B, N, C)


def create_slide_pvt_v2(name: str = "slide_pvt_v2_b2", num_classes: int = 1000, img_size: int = 224,
                        drop_path_rate: float = 0.1, slide_stages: int = 2, ka: int = 3,
                        pretrained_path: Optional[str] = None) -> nn.Module:
    """Slide-PVTv2: timm's PVTv2 with slide attention in the first ``slide_stages`` stages."""
    if name not in VARIANTS:
        raise UserInputError(f"Unknown Slide-PVTv2 model {name!r}; expected one of {sorted(VARIANTS)}.")
    if not 0 <= slide_stages <= 4:
        raise UserInputError(f"slide_stages={slide_stages} is outside 0..4 (PVTv2 has four stages).")
    model = timm.create_model(VARIANTS[name], pretrained=False, num_classes=num_classes,
                              drop_path_rate=drop_path_rate)
    for stage in model.stages[:slide_stages]:
        for blk in stage.blocks:
            old = blk.attn
            blk.attn = SlideTokenAttention(old.dim, old.num_heads, ka=ka, qkv_bias=old.q.bias is not None)
    if pretrained_path:
        load_into(model, pretrained_path)
    return model
