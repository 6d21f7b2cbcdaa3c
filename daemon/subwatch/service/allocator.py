"""Keep the memory of freed frames for the next frame instead of handing it back to the kernel.

Every sub passes through a handful of full-size temporary arrays (the loaded frame, the
calibrated one, detection images, the warped copy): at 26 MP each is 50-100 MB. glibc serves
allocations above 32 MB with a fresh ``mmap`` and unmaps them on ``free``, so every such array
is faulted in page by page and zeroed by the kernel again, frame after frame: two 100 MB
temporaries cost 0.06-0.27 s this way on the reference machine, 0.02 s when their memory is
reused (docs/decisions.md). ``keep_freed_memory`` tells the allocator to take large blocks from
its heap and to keep what is freed there, in one arena for all threads (a worker thread's
arena cannot grow past 64 MB and would fall back anyway). The process then holds on to its
high-water mark: for a daemon that handles frames of one size all night that is its steady
state, and the memory benchmark checks that it stays flat. ``release_freed_memory`` gives the
free pages back after a one-off peak (the warm-up buffer integrated once per stack).

glibc only (``mallopt`` and ``malloc_trim``); elsewhere both do nothing. ``SUBWATCH_MALLOC=
system`` in the environment keeps the allocator's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from functools import cache

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

#: Free memory at the top of the heap up to this much stays with the process.
_TRIM_THRESHOLD = 1 << 30


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - present on glibc only
    except (OSError, AttributeError):
        return None
    return libc


@cache
def keep_freed_memory() -> bool:
    """Switch the process to heap allocation with no trimming; True if it took effect.

    Call it once, in the main thread, before any other thread has started: ``M_ARENA_MAX``
    only stops new arenas being made, and glibc hands the arena of a thread that has ended to
    the next thread started. A process that handles frames in a thread of its own after a
    pool's threads came and went (as a benchmark did) gets such an arena, where big blocks are
    mapped and unmapped again: 6x the page faults, and a 26 MP warp took 0.35-0.60 s instead
    of 0.20 s. ``subwatch run`` calls it first and handles frames in its main thread.
    Idempotent.
    """
    if os.environ.get("SUBWATCH_MALLOC", "").lower() == "system":
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        )
    )
    if not ok:
        log.debug("allocator settings not taken; using the system defaults")
    return ok


def release_freed_memory() -> None:
    """Return the heap's free pages to the kernel (after a one-off peak of memory)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
