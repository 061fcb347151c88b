"""Host memory: keep the memory XLA:CPU frees, so the next step does not page-fault it in again.

XLA:CPU allocates each call's temporary buffer with malloc: 145 MB for the CPU recipe's train step at batch 24.
glibc serves allocations that large with mmap and gives them back with munmap, from XLA's worker threads' arenas,
so every step touched every page of the buffer for the first time: 35,700 page faults a step, about a quarter of
its time (measured in docs/benchmarks.md). With one malloc arena, no mmap for large blocks and no trimming, freed
memory stays in the heap and the next step reuses it: no faults a step once the heap has grown.

It must run before NumPy and JAX start their threads (before JAX creates its CPU client at the latest): the
scripts call it first. It only changes glibc's malloc settings (memory is kept, not returned to the system,
which suits a training process); elsewhere it does nothing.
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>


def keep_freed_memory() -> bool:
    """Set glibc malloc to reuse freed memory (one arena, no mmap, no trim); True when it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return all(mallopt(option, value) == 1 for option, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
