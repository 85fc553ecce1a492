"""accel.cpu_allocator on this glibc machine: an activation-sized block comes from the heap and stays
in the process when freed, ready for the next step (what scripts/benchmark.py relies on for CPU timings),
where glibc's default maps it afresh and unmaps it on free."""
import subprocess
import sys

from conftest import ROOT

# malloc a 64 MB block (twice glibc's largest default mmap threshold) and read mallinfo2 while it is
# held and after free: bytes in mmapped blocks (hblkhd) and free bytes kept in the heap (fordblks).
PROBE = """
import ctypes, sys
from accel.cpu_allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], Info
block = libc.malloc(64 << 20)
held = libc.mallinfo2().hblkhd
libc.free(block)
print(held, libc.mallinfo2().fordblks)
"""


def mallinfo(mode: str):
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(v) for v in done.stdout.split()]


def test_a_freed_activation_sized_block_stays_in_the_process():
    mapped, _ = mallinfo("system")
    assert mapped >= 64 << 20                        # glibc: its own mmap, returned to the system on free
    mapped, kept = mallinfo("kept")
    assert mapped < 64 << 20 and kept >= 64 << 20    # from the heap, and still there after free
