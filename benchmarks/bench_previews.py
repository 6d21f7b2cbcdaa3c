"""How much do previews slow the per-frame path while they run? Process vs thread.

Simulates a session and runs ``subwatch run --once`` on it with every sub already in the
folder (the worker never idle: the worst case) and ``previews.every_frames: 1`` (a preview is
always due). Each run alternates between windows where a preview renders and windows where
nothing does, and a light processed entirely inside a render window is compared with the
lights processed entirely inside the quiet windows *of the same run*: adjacent in time, so a
change in the machine's load (other users, thermal limits) hits both sides alike, which
comparing whole runs cannot promise on a shared machine.

- Thread: the preview function is the real one followed by a pause as long as it took.
- Process: the preview process is stopped and continued (SIGSTOP, SIGCONT) every
  ``--toggle`` seconds; a pause after each preview would not do, because in its idle
  scheduling class a preview makes almost no progress while subs are processed back to back.

Reported per mode (previews in the preview process, or on a thread), over ``--rounds``
interleaved runs: the median seconds per light (``seconds.total`` of frames.jsonl) during a
render and during a pause, the median time between two lights finishing in each (which also
counts the work between frames: the snapshot handed over), and how long one preview took.

    python benchmarks/bench_previews.py --width 3008 --height 3008 --lights 40 --rounds 2

Timings belong in benchmarks/RESULTS.md with the machine and the date, never in tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from subwatch.config import Config
from subwatch.enhance.previews import PreviewRenderer, PreviewRequest
from subwatch.service.daemon import Daemon
from subwatch.service.pipeline import Pipeline
from subwatch.service.previewer import NICE
from subwatch.simulate import SimOptions, simulate_session


def paced_factory():
    """The real preview, then (``BENCH_PAUSE=1``) a pause as long as it took. Module level: it
    travels to the preview process. The render window is in wall-clock time, which processes
    share."""
    real = PreviewRenderer()
    pause = os.environ.get("BENCH_PAUSE") == "1"

    def render(request: PreviewRequest) -> dict[str, Any]:
        start = time.time()
        status = real(request)
        end = time.time()
        if pause:
            time.sleep(end - start)
        status["preview"]["window"] = [start, end]
        return status

    return render


INTERRUPTED = threading.Event()


def _interrupted(signum: int, frame: object) -> None:
    INTERRUPTED.set()  # the toggler continues the preview process and stops toggling
    raise KeyboardInterrupt


class Toggler(threading.Thread):
    """Stops and continues the preview process every ``period`` s; records both windows."""

    def __init__(self, daemon: Daemon, period: float) -> None:
        super().__init__(daemon=True)
        self.target, self.period = daemon, period
        self.running: list[tuple[float, float]] = []
        self.stopped: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        state, since = "running", time.time()
        while not self.done.wait(self.period) and not INTERRUPTED.is_set():
            previewer = self.target.previewer
            proc = getattr(previewer.runner, "_proc", None) if previewer else None
            if proc is None or not proc.is_alive():
                continue
            now = time.time()
            (self.running if state == "running" else self.stopped).append((since, now))
            state = "stopped" if state == "running" else "running"
            os.kill(proc.pid, signal.SIGSTOP if state == "stopped" else signal.SIGCONT)
            since = now
        previewer = self.target.previewer
        proc = getattr(previewer.runner, "_proc", None) if previewer else None
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGCONT)


def _clip(spans: list[tuple[float, float]], within: list[tuple[float, float]]) -> list:
    """The parts of ``spans`` that lie inside one of ``within``."""
    out = []
    for a, b in spans:
        for c, d in within:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((lo, hi))
    return out


def _run(capture: Path, out: Path, mode: str, toggle: float, idle: bool) -> dict[str, Any]:
    """One ``--once`` run: per light (seconds, end time), the busy and the quiet windows."""
    cfg = Config.model_validate(
        {
            "watch": {"path": str(capture)},
            "output": {"path": str(out)},
            "previews": {"every_frames": 1},
        }
    )
    lights: list[tuple[float, float]] = []
    windows: list[tuple[float, float]] = []

    def hook(pipeline: Pipeline) -> None:
        def on_row(row: dict[str, Any]) -> None:
            steady = not row.get("reference") and not row.get("warmup_rejected_pixels")
            if row.get("kind") == "light" and row.get("status") == "stacked" and steady:
                lights.append((row["seconds"]["total"], time.time()))

        pipeline.listeners.append(on_row)
        if daemon.previewer is not None and mode == "process":
            daemon.previewer.runner.idle = idle  # type: ignore[attr-defined]

    def on_result(request: PreviewRequest, status: dict[str, Any]) -> None:
        start, end = status["preview"]["window"]
        windows.append((start, end))
        original(request, status)

    daemon = Daemon(
        cfg, once=True, pipeline_hook=hook, preview_mode=mode, preview_factory=paced_factory
    )
    original = daemon._preview_done
    daemon._preview_done = on_result  # type: ignore[method-assign]
    os.environ["BENCH_PAUSE"] = "1" if mode == "thread" else "0"
    toggler = Toggler(daemon, toggle)
    if mode == "process":
        toggler.start()
    try:
        daemon.run()
    finally:
        toggler.done.set()
        if toggler.is_alive():
            toggler.join()
    if mode == "process":
        busy, quiet = _clip(toggler.running, windows), _clip(toggler.stopped, windows)
    else:
        busy, quiet = windows, [(end, 2 * end - start) for start, end in windows]
    return {"lights": lights, "busy": busy, "quiet": quiet, "windows": windows}


def _split(lights: list[tuple[float, float]], busy: list, quiet: list) -> dict:
    """Lights (and light-to-light intervals) inside busy windows and inside quiet ones."""
    out: dict[str, list[float]] = {"render": [], "pause": [], "render_i": [], "pause_i": []}
    for kind, spans in (("render", busy), ("pause", quiet)):
        for seconds, end in lights:
            if any(a <= end - seconds and end <= b for a, b in spans):
                out[kind].append(seconds)
        for (_, a_end), (_, b_end) in itertools.pairwise(lights):
            if any(a <= a_end and b_end <= b for a, b in spans):
                out[kind + "_i"].append(b_end - a_end)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=3008)
    parser.add_argument("--height", type=int, default=3008)
    parser.add_argument("--lights", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--modes", default="process,thread")
    parser.add_argument("--toggle", type=float, default=2.0, help="process mode: s per window")
    parser.add_argument(
        "--no-idle-class", action="store_true", help="process mode: niceness only, no SCHED_IDLE"
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    # A stopped preview process must be continued even when the benchmark is interrupted.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)

    pooled = {m: {"render": [], "pause": [], "render_i": [], "pause_i": []} for m in modes}
    previews: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "capture"
        sim = SimOptions(
            out=capture, lights=args.lights, width=args.width, height=args.height, seed=args.seed
        )
        simulate_session(sim)
        for round_, mode in itertools.product(range(args.rounds), modes):
            out = Path(tmp) / f"out-{mode}-{round_}"
            got = _run(capture, out, mode, args.toggle, not args.no_idle_class)
            for key, values in _split(got["lights"], got["busy"], got["quiet"]).items():
                pooled[mode][key] += values
            previews[mode] += [end - start for start, end in got["windows"]]
            print(mode, round_, json.dumps({k: len(v) for k, v in pooled[mode].items()}))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"python {platform.python_version()}; {args.width}x{args.height}, {args.lights} lights")
    print(f"{args.rounds} rounds; load average at the end {os.getloadavg()[0]:.1f}")
    if "process" in modes:
        idle = "" if args.no_idle_class else "SCHED_IDLE and "
        print(f"process: {idle}niceness +{NICE}")
    print(
        "| previews in | lights (busy / quiet) | per light, busy / quiet | slowdown "
        "| light to light, busy / quiet | slowdown | one preview |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        p = pooled[mode]
        if not p["render"] or not p["pause"]:
            print(f"| {mode} | {len(p['render'])} / {len(p['pause'])} | - | - | - | - | - |")
            continue
        r, q = statistics.median(p["render"]), statistics.median(p["pause"])
        ri, qi = statistics.median(p["render_i"]), statistics.median(p["pause_i"])
        one = statistics.median(previews[mode])
        print(
            f"| {mode} | {len(p['render'])} / {len(p['pause'])} | {r:.3f} / {q:.3f} s "
            f"| {r / q - 1:+.0%} | {ri:.3f} / {qi:.3f} s | {ri / qi - 1:+.0%} | {one:.1f} s |"
        )


if __name__ == "__main__":
    main()
