"""Backbones: timm ViTs (plain or run with a token reducer) and pyramid models."""
from accel.backbones.evo_levit import create_evo_levit
from accel.backbones.levit import create_levit, fuse_levit
from accel.backbones.reduced_vit import ReducedViT, with_reducer
from accel.backbones.vit import create_vit

__all__ = ["create_vit", "create_levit", "create_evo_levit", "fuse_levit", "ReducedViT", "with_reducer"]
