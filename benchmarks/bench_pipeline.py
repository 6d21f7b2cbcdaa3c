"""Per-frame cost of the whole chain, stage by stage, with peak memory.

Simulates a session of the given size, runs ``subwatch run --once`` on it in this process and
reports the median seconds per stage over the lights (from ``frames.jsonl``), the wall time per
light, and the peak resident memory. Run it on a quiet machine:

    python benchmarks/bench_pipeline.py --width 1024 --height 768 --lights 8
    python benchmarks/bench_pipeline.py --width 6248 --height 4176 --lights 4

Timings belong in benchmarks/RESULTS.md with the machine and the date, never in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from subwatch.config import Config
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session


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
    args = parser.parse_args()

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
        cfg = Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}})
        t0 = time.perf_counter()
        run_daemon(cfg, once=True)
        t_run = time.perf_counter() - t0
        rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]

    lights = [r for r in rows if r["kind"] == "light" and r["status"] in ("stacked", "rejected")]
    # The first light also builds the masters; report it apart.
    later = lights[1:] or lights
    stages = sorted({k for r in later for k in r["seconds"]})
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    kind = "OSC" if args.osc else "mono"
    print(f"frames: {args.width}x{args.height} {kind}, {len(lights)} lights")
    print(f"simulate: {t_sim:.2f} s; run --once: {t_run:.2f} s (calibration frames included)")
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


if __name__ == "__main__":
    main()
