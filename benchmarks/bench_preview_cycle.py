"""Seconds of one full preview cycle, step by step, repeated in one process as the daemon does.

The preview process renders a stack's products over and over all night; its first cycle also
pays for loading the compiled kernels and for the first touch of its working memory, which
later cycles reuse. ``subwatch enhance`` is such a first cycle. This runs ``enhance`` on one
linear stack ``--rounds`` times in one process (the allocator set up first, as in the preview
process) and prints each round's steps, wall and CPU time, so the first cycle and the steady
state are told apart:

    python benchmarks/bench_preview_cycle.py --stack /tmp/stack26.fits --rounds 3
    python benchmarks/bench_preview_cycle.py --width 6248 --height 4176 --rounds 3

Without ``--stack`` a 16-sub stack of the simulator's M42 sky is made first (``make_scene`` of
bench_deconvolve.py) and written as FITS. The denoiser is off unless ``--denoise``: the issue's
cycle is the one without it, and the denoiser has its own benchmark. The memory copy rate
before and after is printed too (see bench_pipeline.py): the machine's speed varies.

Timings belong in benchmarks/RESULTS.md with the machine and the date, never in tests.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from bench_deconvolve import make_scene
from bench_pipeline import machine_speed

from subwatch.config import Config
from subwatch.enhance.cli import enhance
from subwatch.enhance.previews import PreviewOptions
from subwatch.service.allocator import keep_freed_memory

STEPS = ("prepare", "gradient", "snr", "psf", "deconvolve", "denoise", "stretch", "write")


def _stack(folder: Path, width: int, height: int, subs: int, seed: int) -> Path:
    scene = make_scene(width, height, subs, seed)
    path = folder / "stack.fits"
    header = fits.Header()
    header["OBJECT"], header["FILTER"], header["NCOMBINE"] = "M42", "L", subs
    header["EXPTIME"] = 120.0 * subs
    fits.writeto(path, scene.image, header)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", type=Path, help="a linear FITS stack (else one is simulated)")
    parser.add_argument("--width", type=int, default=6248)
    parser.add_argument("--height", type=int, default=4176)
    parser.add_argument("--subs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--denoise", action="store_true", help="include the denoiser")
    args = parser.parse_args()
    keep_freed_memory()  # before any thread, as the preview process does

    cfg = Config.model_validate({"denoise": {"enabled": args.denoise}})
    options = PreviewOptions.from_config(cfg)  # the daemon's defaults
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        stack = args.stack or _stack(folder, args.width, args.height, args.subs, args.seed)
        header = fits.getheader(stack)
        width, height = header["NAXIS1"], header["NAXIS2"]
        rate_before, _ = machine_speed(64, 64)
        rows = []
        for _ in range(args.rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            doc = enhance(stack, folder / "out", options)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append((doc["preview"]["seconds"], wall, cpu, doc.get("deconvolution") or {}))
        rate_after, _ = machine_speed(64, 64)

    steps = [s for s in STEPS if any(s in seconds for seconds, *_ in rows)]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(f"stack: {width}x{height}; denoiser {'on' if args.denoise else 'off'}")
    print(f"memory copy rate: {rate_before:.1f} GB/s before, {rate_after:.1f} GB/s after")
    print("round  " + "  ".join(f"{s:>10s}" for s in steps) + "       total   wall (CPU)  iter")
    for i, (seconds, wall, cpu, dec) in enumerate(rows, 1):
        cells = "  ".join(f"{seconds.get(s, 0.0):10.2f}" for s in steps)
        print(
            f"{i:5d}  {cells}  {seconds['total']:10.2f}  {wall:5.2f} ({cpu:5.2f})"
            f"  {dec.get('iterations', '-')}"
        )
    later = [seconds["total"] for seconds, *_ in rows[1:]]
    if later:
        print(f"later rounds: total median {float(np.median(later)):.2f} s")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
