"""Registration accuracy and speed against truth, side by side with astroalign.

Simulates a night (dithers, rotations, optionally a meridian flip), runs subwatch on it, and
for every light compares the transform in ``frames.jsonl`` with the simulator's truth (RMS
error over the frame, px). astroalign's ``find_transform`` gets the same calibrated frames
(bias-subtracted, hot pixels repaired: on raw frames it matches hot pixels) and is scored the
same way. Times: subwatch's measure + register stages (detection is part of both), and
astroalign's find_transform.

    python benchmarks/bench_register.py --width 1024 --height 768 --lights 8
    python benchmarks/bench_register.py --width 3008 --height 3008 --lights 6 --flip-at 3

Needs the ``bench`` extra (astroalign).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from subwatch.calibration import MasterSet, calibrate_light
from subwatch.config import Config
from subwatch.register import transform_error
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session


def _calibrated(path: Path, bias: float) -> np.ndarray:
    raw = fits.getdata(path).astype(np.float32) - bias
    return calibrate_light(raw, MasterSet(), exptime=None, bayer=None, cosmetic=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--lights", type=int, default=8)
    parser.add_argument("--flip-at", type=int, default=None)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    import astroalign

    with tempfile.TemporaryDirectory() as tmp:
        capture, out = Path(tmp) / "capture", Path(tmp) / "out"
        truth = simulate_session(
            SimOptions(
                out=capture,
                lights=args.lights,
                width=args.width,
                height=args.height,
                seed=args.seed,
                meridian_flip_at=args.flip_at,
                calibration=False,
            )
        )
        cfg = Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}})
        run_daemon(cfg, once=True)
        rows = {
            json.loads(x)["file"]: json.loads(x)
            for x in (out / "frames.jsonl").read_text().splitlines()
        }
        lights = truth["lights"]
        ref_img = _calibrated(capture / lights[0]["file"], truth["bias_adu"])
        ours, theirs, t_ours, t_theirs = [], [], [], []
        for light in lights[1:]:
            row = rows[light["file"]]
            m_true = np.array(light["transform"])
            if row["transform"] is not None:
                ours.append(
                    transform_error(np.array(row["transform"]), m_true, args.width, args.height)
                )
                t_ours.append(row["seconds"].get("measure", 0) + row["seconds"].get("register", 0))
            img = _calibrated(capture / light["file"], truth["bias_adu"])
            t0 = time.perf_counter()
            try:
                tf, _ = astroalign.find_transform(img, ref_img)
                t_theirs.append(time.perf_counter() - t0)
                theirs.append(transform_error(tf.params[:2], m_true, args.width, args.height))
            except Exception as exc:  # astroalign raises on failure; count it
                t_theirs.append(time.perf_counter() - t0)
                print(f"astroalign failed on {light['file']}: {exc}")

    def summary(errors: list[float]) -> str:
        if not errors:
            return "no transform"
        return (
            f"median {statistics.median(errors):.4f} px, max {max(errors):.4f} px (n={len(errors)})"
        )

    subs = len(lights) - 1
    print(f"{args.width}x{args.height}, {subs} subs vs the reference, flip at {args.flip_at}")
    print(f"subwatch:   {summary(ours)}; measure+register median {statistics.median(t_ours):.3f} s")
    print(
        f"astroalign: {summary(theirs)}; find_transform median {statistics.median(t_theirs):.3f} s"
    )


if __name__ == "__main__":
    main()
