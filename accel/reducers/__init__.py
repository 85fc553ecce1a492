"""Token-reduction strategies behind one interface (see base.TokenReducer)."""
from accel.reducers.base import TokenReducer, check_keep_rate

__all__ = ["TokenReducer", "check_keep_rate"]
