"""Memory a burst leaves behind goes back to the operating system.

glibc keeps freed heap memory for reuse, and after a large block is freed it raises its mmap threshold (up to
32 MiB), so later large blocks come from the heap too and stay there. A burst of 6 MB photos once left the
orchestrator at 760 MiB (from 150) long after it ended. A fixed threshold puts every buffer of 128 KiB or more
(photos, gRPC messages, decoded pixels) in its own mapping, unmapped when it is freed; fewer malloc arenas keep
the worker threads' fragments from multiplying. `MALLOC_*` environment variables, when set, are left to rule."""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("copilot.memory")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: blocks this large or larger are mapped on their own (glibc's initial default, kept fixed)
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENAS = 2


def return_freed_memory() -> bool:
    """Sets the allocator's thresholds for this process; False where it is not glibc (nothing changes)."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES),
            (M_ARENA_MAX, ARENAS),
        )
    )
    if not done:
        log.warning("mallopt refused a setting: freed memory may stay with the process")
    return done
