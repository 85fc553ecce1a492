"""accel: efficient vision transformers in plain torch + timm.

Imports neither Lightning nor Hydra, so any training loop can use it:

    from accel.backbones import create_vit
"""
from accel.errors import UserInputError

__all__ = ["UserInputError"]
