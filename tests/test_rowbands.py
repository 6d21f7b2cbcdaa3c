"""Row bands: every row exactly once, errors surface, and a forked child gets its own pool."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from subwatch.rowbands import for_row_bands


@pytest.mark.parametrize(("height", "row_bytes"), [(1, 10), (7, 1 << 20), (1000, 4096), (997, 3)])
def test_every_row_is_visited_once(height: int, row_bytes: int) -> None:
    seen = np.zeros(height, np.int64)
    threads: set[int] = set()
    lock = threading.Lock()

    def band(rows: slice) -> None:
        seen[rows] += 1
        with lock:
            threads.add(threading.get_ident())

    for_row_bands(band, height, row_bytes)
    assert (seen == 1).all()


def test_an_error_in_a_band_is_raised_once_the_workers_stopped() -> None:
    running = threading.Event()

    def band(rows: slice) -> None:
        if rows.start == 0:
            raise ValueError("bad band")
        running.set()

    with pytest.raises(ValueError, match="bad band"):
        for_row_bands(band, 500, 1 << 17)
    for_row_bands(lambda rows: None, 500, 1 << 17)  # the pool is still usable


def _child(queue: multiprocessing.Queue) -> None:
    out = np.zeros(300)

    def band(rows: slice) -> None:
        out[rows] = 1.0

    for_row_bands(band, 300, 1 << 17)
    queue.put(float(out.sum()))


def test_a_forked_child_can_use_the_pool() -> None:
    for_row_bands(lambda rows: None, 300, 1 << 17)  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 300.0


def test_a_band_may_use_bands_itself() -> None:
    """A pass inside a pass runs its inner bands in the calling worker instead of waiting on
    a pool whose workers are all busy with the outer bands."""
    grid = np.zeros((40, 30))

    def inner(row: int) -> None:
        def cells(cols: slice) -> None:
            grid[row, cols] += 1

        for_row_bands(cells, 30, 1 << 16)

    def outer(rows: slice) -> None:
        for row in range(rows.start, rows.stop):
            inner(row)

    for_row_bands(outer, 40, 1 << 16)
    assert (grid == 1).all()
