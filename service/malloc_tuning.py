"""glibc malloc settings for a server that allocates and frees a few MiB per request.

By default glibc hands allocations above a (self-adjusting) threshold to ``mmap`` and gives
freed memory above 128 KiB at the top of the heap back to the kernel, so every 4 MiB request
body and answer lands on fresh pages: about a thousand page faults and a zeroing pass each,
on the event loop and in the compute thread. Keeping buffers under 32 MiB on the heap and up
to ``keep_mib`` of freed memory in the process lets the next request reuse warm pages
(1,048,576-element binary requests at 8 clients: +14 % requests/s, docs/benchmarks.md). The
price is resident memory: up to ``keep_mib`` per malloc arena stays mapped after a burst.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TOP_PAD = 16 << 20


def tune(keep_mib: int) -> bool:
    """Apply the settings (``keep_mib`` 0: leave glibc's defaults). True when applied; False
    where there is no glibc ``mallopt`` (macOS, musl's returns 0)."""
    if keep_mib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, keep_mib << 20),
        (M_TOP_PAD, TOP_PAD),
    ))
