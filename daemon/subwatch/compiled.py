"""Shared set-up of the compiled (numba) loops that spread over the cores.

The loops run on numba's ``workqueue`` threading layer, not OpenMP. OpenMP's worker threads
spin for a while after each parallel loop, and on a 2-core machine they spin on the cores that
the next step (OpenCV, or the next loop) needs. A 26 MP warp then stack update, five
interleaved runs of six each: medians 0.19 / 0.19 s with OpenMP, 0.15 / 0.17 s with
``workqueue``; in one back-to-back pair of runs, 0.25 / 0.31 s against 0.06 / 0.06 s
(docs/decisions.md). ``workqueue`` aborts the process on launches from two threads at once,
so every parallel launch holds ``LAUNCH_LOCK``. ``NUMBA_THREADING_LAYER`` in the environment
still wins.
"""

from __future__ import annotations

import os
import threading

import numba

__all__ = ["LAUNCH_LOCK"]

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

#: Held around every parallel launch (see the module doc).
LAUNCH_LOCK = threading.Lock()
