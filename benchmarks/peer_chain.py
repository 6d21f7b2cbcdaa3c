"""The plain chain of off-the-shelf parts that the per-frame targets are set against.

What a careful script would do with the usual libraries, as ``../shared/research/peers.md``
describes it: read the 16-bit FITS with astropy, calibrate with numpy against masters made
beforehand, sep's background and extraction, astroalign's asterism match on the 50 brightest
sources, OpenCV's bilinear warp and a running mean. No rejection, no measurement, no quality
gates, no coverage map: a floor for a useful live stack, not a competitor in what it does.

``bench_pipeline.py --peer`` runs it on the same capture in the same run, so that both sets
of numbers come from the same minutes of a machine whose speed varies (RESULTS.md). Alone:

    python benchmarks/peer_chain.py /tmp/bench26
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import astroalign
import cv2
import numpy as np
import sep
from astropy.io import fits

STAGES = ("read", "calibrate", "detect", "match", "warp", "stack", "total")
#: Sources handed to astroalign (its ``max_control_points``), as peers.md measured.
CONTROL_POINTS = 50


def _read(path: Path) -> np.ndarray:
    return fits.getdata(path).astype(np.float32)


def _median_of(paths: list[Path]) -> np.ndarray:
    return np.median(np.stack([_read(p) for p in paths]), axis=0).astype(np.float32)


def masters(capture: Path) -> tuple[np.ndarray, np.ndarray]:
    """The master dark (bias included) and the inverse of the normalised master flat."""
    cal = capture / "calibration"
    bias = _median_of(sorted((cal / "bias").rglob("*.fit*")))
    dark = _median_of(sorted((cal / "darks").rglob("*.fit*")))
    flat = _median_of(sorted((cal / "flats").rglob("*.fit*"))) - bias
    flat /= np.median(flat)
    return dark, (1.0 / np.clip(flat, 0.05, None)).astype(np.float32)


def _brightest_sources(image: np.ndarray) -> np.ndarray:
    bkg = sep.Background(image)
    found = sep.extract(image - bkg.back(), 5.0, err=bkg.globalrms)
    order = np.argsort(-found["flux"])[:CONTROL_POINTS]
    return np.column_stack([found["x"][order], found["y"][order]])


def run(capture: Path) -> dict[str, list[float]]:
    """Seconds per stage for every light after the first (the reference), in file order."""
    sep.set_extract_pixstack(10_000_000)
    sep.set_sub_object_limit(4096)
    dark, inv_flat = masters(capture)
    lights = sorted((capture / "lights").rglob("*.fit*"))
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    reference: np.ndarray | None = None
    mean: np.ndarray | None = None
    for n, path in enumerate(lights, 1):
        t = [time.perf_counter()]
        image = _read(path)
        t.append(time.perf_counter())
        image -= dark
        image *= inv_flat
        t.append(time.perf_counter())
        sources = _brightest_sources(image)
        t.append(time.perf_counter())
        if reference is None:
            reference, mean = sources, image
            continue
        transform, _ = astroalign.find_transform(
            sources, reference, max_control_points=CONTROL_POINTS
        )
        t.append(time.perf_counter())
        h, w = image.shape
        warped = cv2.warpAffine(image, transform.params[:2], (w, h), flags=cv2.INTER_LINEAR)
        t.append(time.perf_counter())
        assert mean is not None
        mean += (warped - mean) / np.float32(n)
        t.append(time.perf_counter())
        for stage, t0, t1 in zip(STAGES, t, t[1:], strict=False):
            times[stage].append(t1 - t0)
        times["total"].append(t[-1] - t[0])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", type=Path, help="a session simulated by bench_pipeline.py")
    args = parser.parse_args()
    times = run(args.capture)
    for stage in STAGES:
        print(f"  {stage:10s} median {statistics.median(times[stage]):.3f} s")


if __name__ == "__main__":
    main()
