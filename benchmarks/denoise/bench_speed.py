"""How long the denoiser takes on a full frame, and how much memory, on this machine.

Each size runs in a fresh process (so peak RSS is that size's own): a synthetic linear mono
stack (sky with a gradient, a few thousand Moffat stars, Gaussian noise; the network's cost
does not depend on content), then one onnxruntime session is made (timed apart: the preview
process makes it once per night) and the image is denoised with the config's defaults
(tiles of 512 px, overlap 48, 2 threads, strength 0.8). Reported: wall and CPU seconds of
the denoise call, what of it the noise-model estimate takes, the tiles run, peak RSS, and
the load average (this machine is shared). ``network us/px`` is the network alone on two
488x488 tiles (best of three, after a warm-up): the figure to compare across machines, as
``../shared/research/denoiser.md`` gives it (the shipped U-Net at 0.75-1.0 us/px there).

    python benchmarks/denoise/bench_speed.py                      # 6248x4176 and 3008x3008
    python benchmarks/denoise/bench_speed.py --sizes 3008x3008 --tile 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_stack(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A float32 stack-like image: sky 1000 ADU with a 5 % tilt, 3000 stars, noise 8 ADU."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width), np.float32)
    ramp = np.linspace(0.0, 50.0, width, dtype=np.float32)
    for y0 in range(0, height, 512):  # in bands: the noise of a 26 MP frame in one go is 200 MB
        band = rng.standard_normal((min(512, height - y0), width), dtype=np.float32)
        image[y0 : y0 + band.shape[0]] = 1000.0 + ramp + 8.0 * band
    yy, xx = np.mgrid[-12:13, -12:13]
    stamp = (1.0 + (xx * xx + yy * yy) / 2.5**2) ** -3.0
    stamp /= stamp.sum()
    for x, y, f in zip(
        rng.integers(12, width - 13, 3000),
        rng.integers(12, height - 13, 3000),
        10 ** rng.uniform(2.5, 5.5, 3000),
        strict=True,
    ):
        image[y - 12 : y + 13, x - 12 : x + 13] += (f * stamp).astype(np.float32)
    return image


def network_us_per_px(network: Any, side: int = 488, tiles: int = 2) -> float:
    """Microseconds per pixel of the network alone on ``tiles`` tiles (best of three)."""
    batch = np.random.default_rng(1).standard_normal((tiles, 2, side, side), dtype=np.float32)
    network.run(batch)  # warm-up: the session allocates its buffers on the first run
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        network.run(batch)
        best = min(best, time.perf_counter() - t0)
    return best / (tiles * side * side) * 1e6


def one(size: str, model: str | None, tile: int, overlap: int, threads: int) -> dict:
    from subwatch.enhance.denoise import DenoiseSettings, load_denoiser
    from subwatch.enhance.vst import estimate_noise_model

    width, height = (int(v) for v in size.split("x"))
    image = synthetic_stack(height, width)
    t0 = time.perf_counter()
    denoiser, why = load_denoiser(
        DenoiseSettings(model=model, tile=tile, overlap=overlap, threads=threads)
    )
    if denoiser is None:
        raise SystemExit(why)
    session_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    estimate_noise_model(image)
    noise_s = time.perf_counter() - t0
    us_per_px = network_us_per_px(denoiser.network)
    load0 = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = denoiser(image)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert out.shape == image.shape
    return {
        "size": size,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "noise_model_s": round(noise_s, 2),
        "us_per_px": round(us_per_px, 3),
        "session_s": round(session_s, 2),
        "tiles": denoiser.info["tiles"],
        "tile": "x".join(map(str, denoiser.info["tile"])),
        "overlap": denoiser.info["overlap"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "model": denoiser.network.metadata.get("version", denoiser.network.name),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="6248x4176,3008x3008")
    ap.add_argument("--model")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args.tile, args.overlap, args.threads)))
        return
    print(
        "| frame | wall s | CPU s | of which noise model s | tiles (count, size, overlap) "
        "| peak RSS MB | session s | network us/px | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", size]
        cmd += ["--tile", str(args.tile), "--overlap", str(args.overlap)]
        cmd += ["--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"| {r['size']} | {r['wall_s']} | {r['cpu_s']} | {r['noise_model_s']} "
            f"| {r['tiles']} ({r['tile']}, {r['overlap']}) | {r['peak_rss_mb']} "
            f"| {r['session_s']} | {r['us_per_px']} | {r['load_before']}-{r['load_after']} |",
            flush=True,
        )
    print(f"\nmodel: {r['model']}")


if __name__ == "__main__":
    main()
