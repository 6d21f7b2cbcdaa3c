"""Per-frame cost of the whole chain, stage by stage, with peak memory.

Simulates a session of the given size (or reuses one, ``--capture``), runs the daemon on it in
this process and reports the median seconds per stage over the lights (from ``frames.jsonl``)
and the peak resident memory. Run it on a quiet machine:

    python benchmarks/bench_pipeline.py --width 1024 --height 768 --lights 8
    python benchmarks/bench_pipeline.py --width 6248 --height 4176 --lights 14 --capture /tmp/c26

By default the frames arrive as they do at night: the daemon watches an empty folder, the
calibration frames are put in, then each light in turn once the one before has its row in
``frames.jsonl``, so a light is read just after it was written. ``--batch`` runs ``--once`` over
the whole capture folder instead, where each light comes from the disk (on a machine whose page
cache is smaller than the session, that adds the disk's read time to ``load``). Previews are
off unless ``--previews``: they run in their own process and their effect on the per-frame time
is what ``bench_previews.py`` measures.

The memory copy rate and the time of one bicubic warp of a frame of the session's size, alone,
measured before and after, are printed too: on a shared virtual machine they vary several-fold
over minutes, and per-frame times follow them.

Timings belong in benchmarks/RESULTS.md with the machine and the date, never in tests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from subwatch.config import Config
from subwatch.frames.outputs import read_jsonl
from subwatch.register.warp import INTERPOLATIONS
from subwatch.service.allocator import keep_freed_memory
from subwatch.service.daemon import run_daemon, wait_for
from subwatch.simulate import SimOptions, simulate_session


def machine_speed(width: int, height: int) -> tuple[float, float]:
    """GB/s of a 400 MB memory copy, and seconds of one bicubic warp of a frame this size.

    Both best of three, after a first touch, in a child process (so that its arrays do not
    count in this process's peak RSS). The warp is OpenCV's alone, outside the daemon: read
    beside the ``warp`` stage it tells the machine's minute from the pipeline's own cost.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_machine_speed, (width, height))


def _best_of_three(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _machine_speed(width: int, height: int) -> tuple[float, float]:
    return _copy_rate(), _warp_seconds(width, height)


def _copy_rate() -> float:
    a = np.ones(100_000_000, np.float32)
    b = np.ones_like(a)
    return 2 * a.nbytes / _best_of_three(lambda: np.copyto(b, a)) / 1e9


def _warp_seconds(width: int, height: int) -> float:
    frame = np.random.default_rng(0).normal(1000.0, 10.0, (height, width)).astype(np.float32)
    out = np.empty_like(frame)
    angle = np.deg2rad(0.05)  # a dithered sub with a little field rotation
    matrix = np.array([[np.cos(angle), -np.sin(angle), 3.3], [np.sin(angle), np.cos(angle), -2.7]])
    flags = INTERPOLATIONS["cubic"]
    return _best_of_three(
        lambda: cv2.warpAffine(frame, matrix, (width, height), dst=out, flags=flags)
    )


def peer_times(capture: Path) -> dict[str, list[float]]:
    """``peer_chain.run`` on the capture, in a child process that keeps its memory apart."""
    import peer_chain  # beside this script; needs the bench extra and sep

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peer_chain.run, (capture,))


def _config(watch: Path, out: Path, previews: bool, **watching: float) -> Config:
    return Config.model_validate(
        {
            "watch": {"path": str(watch), **watching},
            "output": {"path": str(out)},
            "previews": {"enabled": previews},
        }
    )


def _arrive(src: Path, capture: Path, watch: Path) -> None:
    """Put one file into the watched folder whole, as a capture program's rename would."""
    dest = watch / src.relative_to(capture)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / f".{dest.name}.part"
    shutil.copyfile(src, part)
    os.replace(part, dest)


def run_live(capture: Path, watch: Path, out: Path, previews: bool) -> None:
    """Feed the capture into a watched folder frame by frame (see the module doc)."""
    watch.mkdir(parents=True)
    cfg = _config(watch, out, previews, settle_seconds=0.2, poll_seconds=0.2)
    stop = threading.Event()
    daemon = threading.Thread(target=run_daemon, args=(cfg,), kwargs={"stop": stop})
    daemon.start()
    journal = out / "frames.jsonl"
    files = sorted(p for p in capture.rglob("*.fit*") if p.name != "truth_sky.fits")
    calibration = [p for p in files if "lights" not in p.relative_to(capture).parts]
    lights = [p for p in files if p not in calibration]
    try:
        for p in calibration:
            _arrive(p, capture, watch)
        if not wait_for(lambda: len(read_jsonl(journal)) >= len(calibration), 600):
            raise RuntimeError("the calibration frames were not all journalled")
        for i, p in enumerate(lights, 1):
            _arrive(p, capture, watch)
            if not wait_for(lambda i=i: len(read_jsonl(journal)) >= len(calibration) + i, 600):
                raise RuntimeError(f"{p.name} was not journalled")
    finally:
        stop.set()
        daemon.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--lights", type=int, default=8)
    parser.add_argument("--osc", action="store_true")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--capture",
        type=Path,
        help="simulate into this folder, or reuse it when it already holds a session",
    )
    parser.add_argument("--batch", action="store_true", help="run --once over the capture")
    parser.add_argument("--previews", action="store_true", help="render previews meanwhile")
    parser.add_argument(
        "--peer",
        action="store_true",
        help="then run the plain chain of peer_chain.py on the same capture (bench extra, sep)",
    )
    args = parser.parse_args()
    # `subwatch run` sets the allocator up in its main thread before any other thread exists,
    # and so must this, before machine_speed's pool starts (and ends) its threads: glibc hands
    # the arena of a thread that ended to the next thread started, whatever M_ARENA_MAX says,
    # and here the daemon runs in a thread of its own. In such an arena every big block goes
    # back to the kernel when freed: each 26 MP frame then paid for fresh memory, 6x the page
    # faults, and the warp stage took 0.35-0.60 s instead of 0.20 s (docs/decisions.md).
    keep_freed_memory()

    with tempfile.TemporaryDirectory() as tmp:
        capture, out = args.capture or Path(tmp) / "capture", Path(tmp) / "out"
        t0 = time.perf_counter()
        if not (capture / "truth.json").is_file():
            simulate_session(
                SimOptions(
                    out=capture,
                    lights=args.lights,
                    width=args.width,
                    height=args.height,
                    seed=args.seed,
                    osc=args.osc,
                )
            )
        t_sim = time.perf_counter() - t0
        # A reused capture has its own size, whatever --width and --height say.
        truth = json.loads((capture / "truth.json").read_text())
        args.width, args.height = int(truth["width"]), int(truth["height"])
        rate_before, warp_before = machine_speed(args.width, args.height)
        t0 = time.perf_counter()
        if args.batch:
            run_daemon(_config(capture, out, args.previews), once=True)
        else:
            run_live(capture, Path(tmp) / "watch", out, args.previews)
        t_run = time.perf_counter() - t0
        rate_after, warp_after = machine_speed(args.width, args.height)
        rows = read_jsonl(out / "frames.jsonl")
        peer = peer_times(capture) if args.peer else None

    lights = [r for r in rows if r["kind"] == "light" and r["status"] in ("stacked", "rejected")]
    # The first light also builds the masters; report it apart.
    later = lights[1:] or lights
    stages = sorted({k for r in later for k in r["seconds"]})
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    kind = "OSC" if args.osc else "mono"
    print(f"frames: {args.width}x{args.height} {kind}, {len(lights)} lights")
    mode = "--once over the folder" if args.batch else "frame by frame into a watched folder"
    print(f"simulate: {t_sim:.2f} s; run ({mode}): {t_run:.2f} s (calibration frames included)")
    print(f"memory copy rate: {rate_before:.1f} GB/s before, {rate_after:.1f} GB/s after")
    print(
        f"OpenCV bicubic warp alone (machine probe): {warp_before:.3f} s before, "
        f"{warp_after:.3f} s after"
    )
    print(f"first light (builds masters): {lights[0]['seconds']['total']:.3f} s")
    # Subs integrated one by one after the warm-up buffer (the steady state of a night), and
    # the one that completed the buffer (it pays for the whole buffer's clipping), apart.
    streamed = [
        r
        for r in later
        if r.get("rejected_pixels") is not None and not r.get("warmup_rejected_pixels")
    ]
    flush = [r for r in later if r.get("warmup_rejected_pixels")]
    for name, group in (("all lights but the first", later), ("after the warm-up", streamed)):
        if not group:
            continue
        print(f"{name}:")
        for stage in stages:
            values = [r["seconds"][stage] for r in group if stage in r["seconds"]]
            if values:
                print(f"  {stage:10s} median {statistics.median(values):.3f} s  (n={len(values)})")
    for r in flush:
        print(f"sub completing the warm-up buffer: total {r['seconds']['total']:.3f} s")
    print(f"peak RSS: {rss_mb:.0f} MB")
    if peer is not None:
        print("plain chain of off-the-shelf parts (peer_chain.py), the same lights:")
        for stage, values in peer.items():
            print(f"  {stage:10s} median {statistics.median(values):.3f} s  (n={len(values)})")


if __name__ == "__main__":
    main()
