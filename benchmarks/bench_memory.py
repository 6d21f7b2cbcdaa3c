"""Resident memory of the daemon's pipeline over a long night: it must stay flat.

Simulates a few lights of the given size (with bias, darks and flats), then feeds the pipeline
``--frames`` lights, one at a time, as a night would: each is a simulated light written under a
new name with its own DATE-OBS (and shifted by a few pixels, so every sub is warped), processed,
checkpointed every ``stacking.checkpoint_frames``, then deleted (the benchmark owns its folder;
the daemon never deletes anything). RSS is read from /proc after every frame. The allocator is
set up as the daemon sets it up (``subwatch.service.allocator``).

    python benchmarks/bench_memory.py --width 6248 --height 4176 --frames 300

Reports RSS after the warm-up buffer has been integrated (the stack's full state exists from
then on), its maximum later, and the drift from one to the other. Results belong in
benchmarks/RESULTS.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.allocator import keep_freed_memory
from subwatch.service.pipeline import Pipeline
from subwatch.simulate import SimOptions, simulate_session


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--base-lights", type=int, default=3)
    parser.add_argument(
        "--capture",
        type=Path,
        help="a simulated session to take the calibration frames and base lights from (read "
        "only; simulating 26 MP calibration frames takes longer than the run itself)",
    )
    args = parser.parse_args()
    # As the daemon does (SUBWATCH_MALLOC=system measures the allocator's defaults).
    print(f"allocator keeps freed memory: {keep_freed_memory()}")

    with tempfile.TemporaryDirectory() as tmp:
        capture, out = Path(tmp) / "capture", Path(tmp) / "out"
        if args.capture is not None:
            source = args.capture
            truth = json.loads((source / "truth.json").read_text())
            capture.mkdir()
            (capture / "calibration").symlink_to((source / "calibration").resolve())
        else:
            source = capture
            truth = simulate_session(
                SimOptions(
                    out=capture, lights=args.base_lights, width=args.width, height=args.height
                )
            )
        bases = []
        for light in truth["lights"][: args.base_lights]:
            path = source / light["file"]
            with fits.open(path) as hdul:
                bases.append((hdul[0].header.copy(), hdul[0].data.copy()))
            if source == capture:
                path.unlink()
        cfg = Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}})
        pipeline = Pipeline(cfg, capture, out)
        calibration = (
            capture.rglob("*.fits")
            if args.capture is None
            else capture.glob("calibration/**/*.fits")
        )
        for path in sorted(p for p in calibration if "truth" not in p.name):
            st = path.stat()
            pipeline.process(path, st.st_size, st.st_mtime)
        start = datetime(2026, 11, 22, 20, 0, 0)
        rng = np.random.default_rng(7)
        series: list[tuple[int, float, float]] = []
        folder = capture / "night"
        folder.mkdir()
        for i in range(args.frames):
            header, data = bases[i % len(bases)]
            header = header.copy()
            header["DATE-OBS"] = (start + timedelta(seconds=70 * i)).isoformat(timespec="seconds")
            dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
            path = folder / f"light_{i:04d}.fits"
            fits.PrimaryHDU(np.roll(data, (dy, dx), axis=(0, 1)), header).writeto(path)
            st = path.stat()
            t0 = time.perf_counter()
            pipeline.process(path, st.st_size, st.st_mtime)
            if pipeline.checkpoint_due():
                pipeline.checkpoint()
            seconds = time.perf_counter() - t0
            path.unlink()
            series.append((i + 1, rss_mb(), seconds))
            if (i + 1) % 25 == 0:
                print(f"frame {i + 1:4d}: RSS {series[-1][1]:7.0f} MB", flush=True)
        pipeline.finish()
        counts = dict(pipeline.counts)

    warm = cfg.stacking.rejection_warmup + 5
    after = [r for _, r, _ in series[warm:]]
    base = after[0]
    print(f"frames: {args.width}x{args.height} mono, {args.frames} lights; outcomes {counts}")
    print(f"RSS after the warm-up (frame {warm + 1}): {base:.0f} MB")
    print(f"RSS max later: {max(after):.0f} MB; at the end: {after[-1]:.0f} MB")
    drift_max, drift_end = 100 * (max(after) / base - 1), 100 * (after[-1] / base - 1)
    print(f"drift: {drift_max:+.1f}% (max), {drift_end:+.1f}% (end)")
    secs = sorted(s for _, _, s in series[warm:])
    print(f"seconds per frame incl. checkpoints: median {secs[len(secs) // 2]:.3f}")


if __name__ == "__main__":
    main()
