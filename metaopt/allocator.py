"""CPU memory allocator tuning: keep freed memory in the process (Linux with glibc only).

The loop engine builds one task's graph, runs its backward and frees it, task after task.  With
glibc's default settings a large free at the top of the heap goes back to the operating system
(``M_TRIM_THRESHOLD``, at most 64 MiB under the dynamic rule) and large blocks are ``mmap``-ed,
so the next task faults every page of its graph in again: 161,249 minor page faults per
meta-iteration on conv4 5-way 1-shot, meta-batch 8, K=5 (about 630 MiB zeroed by the kernel),
against 3,067 with the thresholds raised (``benchmarks/speed.py --malloc default`` and ``keep``:
docs/benchmarks/malloc-default/speed.md and docs/benchmarks/speed.md).

:func:`keep_freed_memory` raises both thresholds with ``mallopt``: freed memory stays in the
process and is reused.  The resident set then stays at its high-water mark instead of shrinking
between tasks.  It changes process-wide behaviour, so the library never calls it on its own:
``metaopt train`` does (config key ``keep_freed_memory``, on by default, CPU runs only), and a
user's own script may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from metaopt.errors import ConfigError

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD_MIB = 1024


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose ``mallopt`` parameters are known here)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(threshold_mib: int = DEFAULT_THRESHOLD_MIB) -> bool:
    """Keep up to ``threshold_mib`` of freed memory in the process and ``malloc`` blocks below
    that size from the heap; True when applied (Linux with glibc), False elsewhere (no change).

    Process-wide and not undone: call it once, at the start of a CPU training program.
    """
    if not isinstance(threshold_mib, int) or isinstance(threshold_mib, bool) or not 1 <= threshold_mib <= 2047:
        raise ConfigError(f"threshold_mib must be an int in [1, 2047] (MiB), got {threshold_mib!r}")
    libc = glibc()
    if libc is None:
        return False
    size = threshold_mib * 2**20
    # setting either disables glibc's dynamic thresholds; set both so large blocks are not mmap-ed
    return bool(libc.mallopt(M_TRIM_THRESHOLD, size)) and bool(libc.mallopt(M_MMAP_THRESHOLD, size))
