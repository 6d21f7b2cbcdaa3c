"""A night copied in at once: 300 files, taken in capture order through a bounded queue.

What is under test is the way from the folder to the worker (events, scanning, sorting, the
queue and its backpressure), so each file's trip through the pipeline is replaced by a row
that only records it: the real chain would spend its 10 ms a file parsing headers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from subwatch.frames import capture_time
from subwatch.service.pipeline import Pipeline
from watching import Running, bias_bytes, rows, wait_until, watch_config

BURST = 300
BOUND = 8


def _write_shuffled(folder: Path) -> list[str]:
    """300 subs written in a random order with one mtime, as a copy leaves them.

    Names carry no order either, so only the headers' DATE-OBS can give it."""
    folder.mkdir(parents=True)
    order = list(range(BURST))
    random.Random(5).shuffle(order)
    names = {}
    for i in order:
        name = f"sub_{(i * 7919) % 1000:03d}_{i}.fits"
        (folder / name).write_bytes(bias_bytes(i, size=16))
        os.utime(folder / name, (1.7e9, 1.7e9))
        names[i] = name
    return [names[i] for i in range(BURST)]


@pytest.fixture
def light_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    def process(self: Pipeline, path: Path, size: int, mtime: float) -> dict:
        row = self.error_row(path, "recorded", size, mtime)
        row.update(status="calibration", reason=None, taken=capture_time(path))
        self.record(row)
        return row

    monkeypatch.setattr(Pipeline, "process", process)


@pytest.mark.parametrize("when", ["present at start-up", "moved in while running"])
def test_a_burst_is_taken_in_capture_order_through_a_bounded_queue(
    tmp_path: Path, when: str, light_pipeline: None
) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    staging = (watch if when == "present at start-up" else tmp_path / "staging") / "night"
    expected = [f"night/{name}" for name in _write_shuffled(staging)]
    with Running(watch_config(watch, out), queue_size=BOUND) as running:
        if when == "moved in while running":
            staging.rename(watch / "night")  # one event for the whole folder
        wait_until(lambda: len(running.rows()) >= BURST, f"{BURST} rows", timeout=120)
        queue = running.daemon.queue
    got = rows(out)
    assert [r["file"] for r in got] == expected
    assert all(r["status"] == "calibration" for r in got)
    taken = [r["taken"] for r in got]
    assert taken == sorted(taken) and len(set(taken)) == BURST
    # The queue filled up (so the backlog really waited in the folder) and never went past it.
    assert queue.high_water == BOUND
    assert queue.maxsize == BOUND
