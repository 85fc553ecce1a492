"""Token-reduction strategies behind one interface (see base.TokenReducer), the typed records of
what they decided (selection), and the surface of every token-reducing network (protocol)."""
from accel.reducers.ats import ATS
from accel.reducers.base import TokenReducer, check_keep_rate
from accel.reducers.diffrate import DiffRate
from accel.reducers.dpcknn import DPCKNN
from accel.reducers.dynamicvit import DynamicViT
from accel.reducers.evit import EViT
from accel.reducers.evo import EvoViT
from accel.reducers.kmedoids import KMedoids
from accel.reducers.patchmerger import PatchMerger
from accel.reducers.protocol import TokenReducingNet
from accel.reducers.selection import ClusteredTokens, KeptTokens, MergedTokens, Selection, SlowFastTokens
from accel.reducers.tome import ToMe
from accel.reducers.topk import TopK

__all__ = ["TokenReducer", "check_keep_rate", "ATS", "EViT", "EvoViT", "ToMe", "TokenReducingNet", "Selection",
           "KeptTokens", "SlowFastTokens", "MergedTokens", "TopK", "KMedoids", "DPCKNN", "PatchMerger",
           "ClusteredTokens"]
__all__ += ["DiffRate"]
__all__ += ["DynamicViT"]
