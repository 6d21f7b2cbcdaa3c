"""The preview scheduler: cadence, coalescing, never in the worker's way, failures contained."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preview_standins import describe_factory, sleepy_factory
from subwatch.config import Config, PreviewsConfig
from subwatch.enhance.previews import PreviewRequest, StackSnapshot
from subwatch.service.daemon import Daemon, wait_for
from subwatch.service.previewer import Previewer, PreviewSchedule
from subwatch.simulate import SimOptions, simulate_session

KEY = ("M42", "L")


def _request(frames: int, key: tuple[str, str] = KEY, value: float = 1.0) -> PreviewRequest:
    image = np.full((8, 8), value, np.float32)
    return PreviewRequest(StackSnapshot(image, *key, n_frames=frames), Path("unused"))


def _ask(previewer: Previewer, frames: int, key: tuple[str, str] = KEY, value: float = 1.0):
    """Request a preview as the daemon does: the snapshot is made when it is its turn."""
    previewer.request(key, lambda: _request(frames, key, value))


class Recorder:
    """Collects on_result calls; ``wait(n)`` until n results arrived."""

    def __init__(self) -> None:
        self.results: list[tuple[PreviewRequest, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, request: PreviewRequest, status: dict[str, Any]) -> None:
        with self._cond:
            self.results.append((request, status))
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.results) >= n, timeout)

    @property
    def frames(self) -> list[int]:
        return [r.snapshot.n_frames for r, _ in self.results]


def test_every_frames_cadence() -> None:
    cfg = PreviewsConfig(every_frames=3, every_seconds=1e6)
    schedule = PreviewSchedule()
    due = []
    for frames in range(1, 10):
        if schedule.due(KEY, frames, cfg, now=0.0):
            schedule.mark(KEY, frames, 0.0)
            due.append(frames)
    assert due == [3, 6, 9]


def test_every_seconds_needs_new_subs() -> None:
    cfg = PreviewsConfig(every_frames=100, every_seconds=60)
    schedule = PreviewSchedule()
    assert not schedule.due(KEY, 1, cfg, now=0.0)  # the clock starts at the first sighting
    assert schedule.due(KEY, 1, cfg, now=61.0)
    schedule.mark(KEY, 1, 61.0)
    assert not schedule.due(KEY, 1, cfg, now=500.0)  # nothing new since
    assert schedule.due(KEY, 2, cfg, now=500.0)


def test_newer_request_replaces_the_pending_one() -> None:
    entered, release = threading.Event(), threading.Event()
    snapshots: list[int] = []

    def factory():
        def render(request: PreviewRequest) -> dict[str, Any]:
            entered.set()
            assert release.wait(60)
            return {"frames": request.snapshot.n_frames}

        return render

    def ask(frames: int, key: tuple[str, str] = KEY) -> None:
        def snapshot() -> PreviewRequest:
            snapshots.append(frames)
            return _request(frames, key)

        previewer.request(key, snapshot)

    recorder = Recorder()
    previewer = Previewer(mode="thread", factory=factory, on_result=recorder)
    try:
        ask(1)
        assert entered.wait(30)  # the first is rendering, not pending
        for frames in (2, 3, 4):
            ask(frames)
        ask(7, key=("M42", "R"))
        assert previewer.pending() == [KEY, ("M42", "R")]  # one per stack, in order of arrival
        assert previewer.replaced == 2
        release.set()
        assert previewer.wait_idle(timeout=60)
    finally:
        release.set()
        previewer.close(drain=False)
    assert recorder.frames == [1, 4, 7]
    assert snapshots == [1, 4, 7]  # no stack was copied to be thrown away


def test_a_failing_preview_is_one_log_line_and_the_next_works(caplog) -> None:
    calls = []

    def factory():
        def render(request: PreviewRequest) -> dict[str, Any]:
            calls.append(request.snapshot.n_frames)
            if len(calls) == 1:
                raise RuntimeError("no stars in this stack\nsecond line")
            return {"ok": True}

        return render

    recorder = Recorder()
    previewer = Previewer(mode="thread", factory=factory, on_result=recorder)
    try:
        with caplog.at_level(logging.ERROR, logger="subwatch.service.previewer"):
            _ask(previewer, 1)
            assert previewer.wait_idle(timeout=60)
            _ask(previewer, 2)
            assert recorder.wait(1)
    finally:
        previewer.close(drain=True)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is None
    assert errors[0].getMessage() == (
        "preview of M42/L failed: RuntimeError: no stars in this stack"
    )
    assert recorder.frames == [2]
    assert previewer.failed == 1 and previewer.done == 1


# -- the process mode ------------------------------------------------------------------------


def test_process_mode_gets_the_image_and_survives_errors_and_crashes(caplog) -> None:
    recorder = Recorder()
    previewer = Previewer(mode="process", factory=describe_factory, on_result=recorder, nice=5)
    rng = np.random.default_rng(1)
    image = rng.normal(100, 5, (60, 80, 3)).astype(np.float32)
    image[:4] = np.nan
    expected = float(np.nansum(image, dtype=np.float64))
    try:
        with caplog.at_level(logging.ERROR, logger="subwatch.service.previewer"):
            request = PreviewRequest(StackSnapshot(image.copy(), *KEY, n_frames=5), Path("x"))
            previewer.request(KEY, lambda: request)
            assert recorder.wait(1)
            for frames in (13, 66):  # an exception, then a dead process
                _ask(previewer, frames)
                assert previewer.wait_idle(timeout=60)
            _ask(previewer, 20, value=2.0)
            assert recorder.wait(2)
    finally:
        previewer.close(drain=False)
    first, last = recorder.results[0][1], recorder.results[1][1]
    assert first["pid"] != os.getpid()
    assert first["nice"] >= os.nice(0) + 5
    assert first["shape"] == [60, 80, 3] and first["nan"] == 4 * 80 * 3
    assert first["sum"] == pytest.approx(expected, rel=1e-6)
    assert last["pid"] != first["pid"]  # started again after the crash
    assert last["sum"] == pytest.approx(2.0 * 64)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert messages[0] == "preview of M42/L failed: ValueError: unlucky stack"
    assert messages[1].startswith("preview of M42/L failed: the preview process died")
    assert len(messages) == 2


def test_a_stop_abandons_a_running_preview_process() -> None:
    previewer = Previewer(mode="process", factory=sleepy_factory)
    _ask(previewer, 1)
    assert wait_for(lambda: previewer.busy is not None, timeout=30)
    _ask(previewer, 2)
    runner = previewer.runner
    assert wait_for(lambda: runner._proc is not None, timeout=30)
    proc = runner._proc
    previewer.close(drain=False)
    assert not proc.is_alive()
    assert previewer.pending() == [] and previewer.done == 0


# -- in the daemon --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("capture")
    simulate_session(SimOptions(out=folder, lights=6, width=320, height=240, seed=4))
    return folder


def test_a_slow_preview_does_not_hold_up_the_frames(capture: Path, tmp_path: Path) -> None:
    """Every sub is stacked while the first preview is still running; the last preview of the
    run (``--once``) then covers them all."""
    entered, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def factory():
        def render(request: PreviewRequest) -> dict[str, Any]:
            seen.append(request.snapshot.n_frames)
            entered.set()
            assert release.wait(120)
            return {"snr": 10.0 * request.snapshot.n_frames, "preview": {"frames": seen[-1]}}

        return render

    out = tmp_path / "out"
    cfg = Config.model_validate(
        {
            "watch": {"path": str(capture)},
            "output": {"path": str(out)},
            "previews": {"every_frames": 1},
        }
    )
    daemon = Daemon(cfg, once=True, preview_mode="thread", preview_factory=factory)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert entered.wait(60)

        def all_stacked() -> bool:
            p = daemon.pipeline
            return p is not None and p.counts.get("stacked", 0) == 6

        assert wait_for(all_stacked, timeout=120)
        assert not release.is_set() and seen == [1]  # the preview is still running
    finally:
        release.set()
        runner.join(timeout=120)
    assert not runner.is_alive()
    assert seen[-1] == 6 and len(seen) == 2  # requests for 2..6 coalesced into one
    status = json.loads((out / "M42" / "L" / "status.json").read_text())
    assert status["snr"] == 60.0 and status["frames_stacked"] == 6
    assert status["snr_history"] == []  # the stand-in reports no integration time
