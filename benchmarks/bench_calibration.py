"""Cost of calibration: building a master, and calibrating one light, with peak memory.

Two measurements, each in a child process of its own so that its peak resident memory is its
own:

* ``build``: a master from N raw 16-bit FITS frames on disk (default 10 of 3008x3008), through
  the library as the daemon does it: read a block of rows at a time, sigma-clipped mean,
  master written with its provenance. The frames are written before the clock starts.
* ``calibrate``: one 6248x4176 light through ``calibrate_light`` with a bias, a dark, a flat and
  a hot-pixel list from the dark; also the same light scaled from a dark of another exposure,
  without a dark (each frame's own outliers searched), and the outlier search alone, mono and
  colour.

Timings are the median of ``--repeat`` runs (at least 3) with ``time.perf_counter``; run on a
quiet machine and put the figures, with the machine and the date, in benchmarks/RESULTS.md:

    python benchmarks/bench_calibration.py
    python benchmarks/bench_calibration.py --frames 20 --width 6248 --height 4176
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits


def _rss_mb() -> float:
    """Peak resident memory of this process, MB.

    On Linux VmHWM, which starts afresh at exec; ``ru_maxrss`` would carry the parent's peak
    into the child that measures.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_time(fn: Callable[[], object], repeat: int) -> tuple[float, list[float], float]:
    """Median wall seconds, every run's wall seconds, and the median CPU seconds (all threads).

    On a shared machine the CPU time moves much less than the wall time: report both.
    """
    times, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), times, statistics.median(cpu)


def _write_raw(folder: Path, n: int, width: int, height: int, seed: int) -> list[Path]:
    """Raw darks as a camera writes them: uint16 (BZERO 32768), bias + current + noise."""
    rng = np.random.default_rng(seed)
    base = 1000 + rng.normal(0, 3, (height, width)).astype(np.float32)
    hot = rng.random((height, width), dtype=np.float32) < 1e-3
    base[hot] += 3000
    paths = []
    for i in range(n):
        frame = base + rng.standard_normal((height, width), dtype=np.float32) * 8
        if i == 1:
            frame[rng.integers(0, height, 200), rng.integers(0, width, 200)] = 60000  # rays
        hdu = fits.PrimaryHDU(np.clip(np.rint(frame), 0, 65535).astype(np.uint16))
        hdu.header["IMAGETYP"] = "Dark Frame"
        hdu.header["EXPTIME"] = 60.0
        hdu.header["GAIN"] = 100
        hdu.header["CCD-TEMP"] = -10.0
        path = folder / f"dark_{i:03d}.fits"
        hdu.writeto(path)
        paths.append(path)
    return paths


def bench_build(args: argparse.Namespace) -> dict[str, object]:
    from subwatch.calibration import CalibrationLibrary, read_meta
    from subwatch.calibration.combine import open_source, sigma_clipped_mean
    from subwatch.config import CalibrationConfig

    paths = sorted(Path(args.dir).glob("dark_*.fits"))
    meta = read_meta(paths[0])
    rss_start = _rss_mb()
    runs = iter(range(1000))

    def build() -> None:
        lib = CalibrationLibrary(Path(args.dir) / f"masters{next(runs)}", CalibrationConfig())
        for path in paths:
            lib.add(path, meta)
        (master,) = lib.build_all()
        assert master.n_frames == len(paths)

    t_build, all_build, cpu_build = _median_time(build, args.repeat)
    rss_build = _rss_mb()

    def combine_only() -> None:
        sources = [open_source(p) for p in paths]
        sigma_clipped_mean(sources)
        for source in sources:
            source.close()

    t_combine, _, cpu_combine = _median_time(combine_only, args.repeat)
    t_one, _, _ = _median_time(
        lambda: sigma_clipped_mean([open_source(p) for p in paths], workers=1), args.repeat
    )
    return {
        "what": f"master from {len(paths)} frames of {args.width}x{args.height} uint16 FITS",
        "build_s": round(t_build, 3),
        "build_runs_s": [round(t, 3) for t in all_build],
        "build_cpu_s": round(cpu_build, 3),
        "combine_from_files_s": round(t_combine, 3),
        "combine_from_files_cpu_s": round(cpu_combine, 3),
        "combine_from_files_one_worker_s": round(t_one, 3),
        "peak_rss_mb_at_start": round(rss_start),
        "peak_rss_mb_after_builds": round(rss_build),
    }


def bench_calibrate(args: argparse.Namespace) -> dict[str, object]:
    from subwatch.calibration import MasterSet, calibrate_light
    from subwatch.calibration.apply import find_dark_defects, find_outlier_pixels
    from subwatch.calibration.library import GroupKey, Master

    h, w = args.light_height, args.light_width
    rng = np.random.default_rng(args.seed)

    def noise(sigma: float) -> np.ndarray:
        out = rng.standard_normal((h, w), dtype=np.float32)
        out *= np.float32(sigma)
        return out

    bias = noise(2) + np.float32(1000)
    dark = bias + noise(1) + np.float32(20)
    hot = rng.random((h, w), dtype=np.float32) < 5e-4
    dark[hot] += 2000
    yy = ((np.arange(h, dtype=np.float32) - h / 2) / h) ** 2
    xx = ((np.arange(w, dtype=np.float32) - w / 2) / w) ** 2
    flat = (1 - 0.3 * (yy[:, None] + xx[None, :])).astype(np.float32)
    raw = noise(30)
    raw += bias
    raw += 20 + 800 * flat
    raw[hot] += 2000

    def master(kind: str, data: np.ndarray, exptime: float | None = None) -> Master:
        return Master(GroupKey(kind, w, h, exptime=exptime), data, 10, None)

    m_bias, m_dark, m_flat = master("bias", bias), master("dark", dark, 60.0), master("flat", flat)
    m_dark.defects = find_dark_defects(dark)
    m_flat.defects = np.zeros((0, 2), np.intp)
    rss_start = _rss_mb()
    full = MasterSet(bias=m_bias, dark=m_dark, flat=m_flat)
    scaled = MasterSet(bias=m_bias, dark=m_dark, flat=m_flat, dark_scale=0.5)
    no_dark = MasterSet(bias=m_bias, flat=m_flat)
    out = {
        "what": f"one {w}x{h} light",
        "hot_pixels_listed": len(m_dark.defects),
    }
    cases = {
        "calibrate_bias_dark_flat_hotlist_s": lambda: calibrate_light(raw, full, bayer=None),
        "calibrate_scaled_dark_s": lambda: calibrate_light(raw, scaled, bayer=None),
        "calibrate_no_dark_outlier_search_s": lambda: calibrate_light(raw, no_dark, bayer=None),
        "outlier_search_mono_s": lambda: find_outlier_pixels(raw),
        "outlier_search_cfa_s": lambda: find_outlier_pixels(raw, cfa=True),
    }
    for name, fn in cases.items():
        fn()  # warm: the scaled dark is made once per night, not per light
        t, runs, cpu = _median_time(fn, args.repeat)
        out[name] = round(t, 4)
        out[name[:-2] + "_cpu_s"] = round(cpu, 4)
        out[name[:-2] + "_runs_s"] = [round(x, 4) for x in runs]
    out["peak_rss_mb_with_masters_and_light"] = round(rss_start)
    out["peak_rss_mb_after_calibrations"] = round(_rss_mb())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--width", type=int, default=3008)
    parser.add_argument("--height", type=int, default=3008)
    parser.add_argument("--light-width", type=int, default=6248)
    parser.add_argument("--light-height", type=int, default=4176)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--only", choices=["build", "calibrate"])
    parser.add_argument("--dir", help="folder of raw frames already written (for --only build)")
    args = parser.parse_args()
    args.repeat = max(3, args.repeat)
    if args.only == "build":
        print(json.dumps(bench_build(args)))
        return
    if args.only == "calibrate":
        print(json.dumps(bench_calibrate(args)))
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print(f"numpy {np.__version__}; median of {args.repeat} runs")
    with tempfile.TemporaryDirectory() as tmp:
        _write_raw(Path(tmp), args.frames, args.width, args.height, args.seed)
        for part in ("build", "calibrate"):
            cmd = [sys.executable, __file__, "--only", part, "--dir", tmp, *sys.argv[1:]]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            report = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"\n{part}: {report.pop('what')}")
            for key, value in report.items():
                print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
