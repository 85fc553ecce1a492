"""Token-reduction strategies behind one interface (see base.TokenReducer)."""
from accel.reducers.base import TokenReducer, check_keep_rate
from accel.reducers.evit import EViT
from accel.reducers.evo import EvoViT
from accel.reducers.tome import ToMe

__all__ = ["TokenReducer", "check_keep_rate", "EViT", "EvoViT", "ToMe"]
