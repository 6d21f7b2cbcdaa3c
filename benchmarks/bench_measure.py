"""Per-frame measurement speed: ``measure_frame`` on one simulated light at camera sizes.

For each size one mono light is simulated (no calibration frames, bias subtracted), then
``measure_frame`` runs ``--repeat`` times; the table gives the median and the fastest wall
time, the peak of numpy/Python allocations during one call (tracemalloc) and the process's
peak RSS, and what was measured (stars, FWHM) so a fast but wrong run shows. ``--profile``
prints the top functions of one call by cProfile.

    python benchmarks/bench_measure.py                      # 6248x4176 and 3008x3008
    python benchmarks/bench_measure.py --sizes 1024x768 --repeat 9 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from subwatch.measure import measure_frame
from subwatch.simulate import SimOptions, Simulation


def simulate_light(width: int, height: int, seed: int) -> tuple[np.ndarray, float, float]:
    """One bias-subtracted light (float32 ADU), its true FWHM and the saturation level."""
    opts = SimOptions(
        out=Path(tempfile.gettempdir()) / "bench_measure",
        lights=1,
        width=width,
        height=height,
        seed=seed,
        calibration=False,
    )
    sim = Simulation(opts)
    light = sim.light_frame(0).astype(np.float32)
    light -= np.float32(opts.bias_adu)
    return light, float(sim.plans[0].fwhm), opts.full_well / opts.gain - opts.bias_adu


def bench(image: np.ndarray, saturation: float, repeat: int) -> dict[str, float]:
    measure_frame(image, saturation=saturation)  # warm-up: caches, page faults
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        m = measure_frame(image, saturation=saturation)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    measure_frame(image, saturation=saturation)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_alloc_mb": peak / 1e6,
        "stars": float(m.n_stars),
        "measured": float(len(m.stars)),
        "fwhm": float(m.fwhm or float("nan")),
        "hfr": float(m.hfr or float("nan")),
    }


def profile(image: np.ndarray, saturation: float, top: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    measure_frame(image, saturation=saturation)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6248x4176,3008x3008", help="WxH list, comma separated")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per size (>= 5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile one call per size")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        t0 = time.perf_counter()
        image, true_fwhm, saturation = simulate_light(w, h, args.seed)
        sim_s = time.perf_counter() - t0
        r = bench(image, saturation, max(5, args.repeat))
        rows.append((f"{w}x{h}", w * h / 1e6, true_fwhm, sim_s, r))
        if args.profile:
            print(f"--- profile {w}x{h}")
            print(profile(image, saturation))
        del image
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(
        "| size | MP | measure median s | min s | peak alloc MB | stars | measured "
        "| FWHM (true) | HFR |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mp, true_fwhm, _, r in rows:
        print(
            f"| {name} | {mp:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} "
            f"| {r['peak_alloc_mb']:.0f} | {r['stars']:.0f} | {r['measured']:.0f} "
            f"| {r['fwhm']:.3f} ({true_fwhm:.3f}) | {r['hfr']:.3f} |"
        )
    print(f"peak RSS of the process: {rss:.0f} MB (includes simulating the lights)")
    print("simulation s: " + ", ".join(f"{name} {s:.1f}" for name, _, _, s, _ in rows))


if __name__ == "__main__":
    main()
