"""Element-wise passes over a whole frame, spread over the cores a band of rows at a time.

numpy's element-wise operations release the GIL but run on one core: on a 26 MP frame each
costs 10-40 ms, and the per-frame path has several (turning the file's big-endian integers
into float32, subtracting bias and dark, dividing by the flat). Cut into bands of a few
hundred kB and run by a small shared pool, they use every core, and the operations of one
band follow each other while its rows are still in cache, where whole-frame temporaries go to
memory and back between operations (docs/decisions.md, "The per-frame path ...").

The pool is created on first use and forgotten in a forked child (its threads do not survive
a fork). Bands of one call never overlap, so a function that writes only its own rows needs
no lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["WORKERS", "for_row_bands"]

#: Threads of the shared pool: the cores, at most four (the passes are memory-bound beyond).
WORKERS = max(1, min(4, os.cpu_count() or 1))

#: Rows per band are chosen so a band of the widest array a pass touches is about this size.
BAND_BYTES = 1 << 19

_THREAD_PREFIX = "subwatch-bands"
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix=_THREAD_PREFIX)
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def for_row_bands(
    fn: Callable[[slice], None], height: int, row_bytes: int, band_bytes: int = BAND_BYTES
) -> None:
    """Call ``fn(rows)`` for consecutive row slices covering ``0..height``, on all cores.

    ``row_bytes`` is the size of one row of the widest array ``fn`` touches; with
    ``band_bytes`` it sets the band height. An exception raised by ``fn`` stops that worker's
    remaining bands and is raised here once every worker has stopped.
    """
    if height <= 0:
        return
    rows = max(1, min(height, band_bytes // max(1, row_bytes)))
    bands = [slice(r0, min(height, r0 + rows)) for r0 in range(0, height, rows)]
    # Called from inside a band (a pool thread), waiting on the pool could wait for ever.
    nested = threading.current_thread().name.startswith(_THREAD_PREFIX)
    if WORKERS == 1 or len(bands) == 1 or nested:
        for band in bands:
            fn(band)
        return

    # One task per worker, each taking every WORKERS-th band: few submissions, even shares.
    def run(first: int) -> None:
        for band in bands[first::WORKERS]:
            fn(band)

    futures = [_shared_pool().submit(run, i) for i in range(min(WORKERS, len(bands)))]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
