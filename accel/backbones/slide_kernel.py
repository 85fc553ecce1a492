"""Loader for the fused CPU kernel of re-parameterised slide attention (``slide_kernel.c``).

The kernel is plain C, compiled once per machine with the system C compiler (``$CC``, else ``cc``)
into a cache directory (``$ACCEL_KERNEL_CACHE``, default ``~/.cache/accel``) and called through
ctypes, which releases the GIL, so the image rows are split across ``torch.get_num_threads()``
Python threads. No torch headers are needed, so the build takes about a second. When there is no
compiler, or ``ACCEL_SLIDE_KERNEL=0``, :func:`available` is False and slide attention uses its torch
path; a warning says why once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from accel.atomic import atomic_path

SOURCE = Path(__file__).with_name("slide_kernel.c")
# Reassociation lets the compiler vectorise the per-slot dot products; results stay within 1e-5.
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math"]


def _cpu_signature() -> str:
    """Kernels are built with -march=native, so a cache shared between machines keys on the CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("ACCEL_KERNEL_CACHE", Path.home() / ".cache" / "accel"))


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"slide_kernel-{key}.so"
    if target.exists():
        return target
    # Concurrent builders each compile into their own temporary; none sees a half-written library.
    with atomic_path(target) as tmp:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True)
    return target


@lru_cache(maxsize=1)
def _library():
    if os.environ.get("ACCEL_SLIDE_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        warnings.warn("No C compiler found (set CC or install gcc); slide attention uses its slower torch path.")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"Building the slide attention kernel with {compiler} failed ({detail.strip()[:300]}); "
                      "slide attention uses its slower torch path.")
        return None
    fn = lib.slide_attention_rows
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
    return fn


def available() -> bool:
    """True when the compiled kernel can be used on this machine."""
    return _library() is not None


def supports(ka: int, head_dim: int) -> bool:
    """The kernel is specialised for 3×3 windows and head dims that are multiples of 16 (≤ 256)."""
    return ka == 3 and head_dim % 16 == 0 and head_dim <= 256


@lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slide-kernel")


# Dynamo cannot trace the ctypes call or the thread pool: under torch.compile the kernel runs as a
# graph break, eagerly, between the compiled parts.
@torch.compiler.disable
def slide_attention(qkv: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor,
                    num_heads: int, ka: int, scale: float) -> torch.Tensor:
    """Slide attention on a channels-last qkv map [B, H, W, nh·3·hd] (per head [q|k|v]).

    ``weight`` [ka², ka², hd] and ``bias`` [ka², hd] are the merged depthwise convolution rearranged
    slot-major; ``table`` [nh, ka²] the position table. Returns [B, H, W, nh·hd] (float32, CPU)."""
    fn = _library()
    if fn is None:
        raise RuntimeError("the slide attention kernel is not available on this machine")
    tensors = (qkv, weight, bias, table)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("the slide kernel takes float32 CPU tensors, got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
    B, H, W, C3 = qkv.shape
    hd = C3 // (3 * num_heads)
    if not supports(ka, hd):
        raise ValueError(f"the slide kernel takes ka=3 and head_dim a multiple of 16 up to 256, got ka={ka}, head_dim={hd}")
    qkv, weight, bias, table = (t.contiguous() for t in (qkv, weight, bias, table))
    out = torch.empty(B, H, W, num_heads * hd, dtype=qkv.dtype)
    rows = B * H
    workers = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * i // workers for i in range(workers + 1)]
    args = [qkv.data_ptr(), weight.data_ptr(), bias.data_ptr(), table.data_ptr(), out.data_ptr(),
            B, H, W, num_heads, hd, float(scale)]
    if workers == 1:
        fn(*args, 0, rows)
    else:
        list(_pool(workers).map(lambda i: fn(*args, bounds[i], bounds[i + 1]), range(workers)))
    return out
