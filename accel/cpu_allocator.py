"""Keep freed memory in the process on a glibc CPU, as PyTorch's CUDA caching allocator does on a GPU.

glibc's malloc serves blocks above its mmap threshold (at most 32 MB by default) with a fresh ``mmap``
and unmaps them when freed, and it trims the top of its heap back to the system. A ViT's activation
tensors at batch 32 and 224 px are of that size (DeiT-S's MLP hidden states: 39 MB), so every step
page-faults them in again, a cost proportional to the bytes allocated rather than to the arithmetic.
The models with fewer tokens fall below the threshold and reuse their memory, so timings without this
measure the allocator as much as the model (DeiT-S's training forward took 2.5 s instead of 1.8 s).
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Serve blocks up to ``limit_bytes`` from the heap and never trim it, so freed activations are
    reused by the next step. True where glibc accepted both settings; False elsewhere (macOS, musl),
    where nothing is changed."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
