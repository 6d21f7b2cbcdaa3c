"""The denoiser on real frames, where there is no truth: a short stack against a deep one.

Data: the 24 raw 20 s subs of Arp 186 in ``../shared/data/real/jocular-arp186/`` (ASI290MM,
2x2 binned, 548x544, no calibration frames). Each sub gets subwatch's own treatment: isolated
hot pixels replaced (``find_outlier_pixels``, ``correct_pixels``), stars measured
(``measure_frame``), registered on the first sub (``find_transform``) and warped onto its
grid (``warp_image``, bicubic as in the daemon), its sky median moved to the first sub's.
The subs are split into six disjoint sets of 4 (subs 1-4, 5-8, ...); for each split, A is
the mean of the 4 and B the mean of the other 20, on the same grid, over the area every sub
covers.

Why this measures quality: B = truth + n_B with n_B independent of A, so for any denoiser f
``E ||f(A) - B||^2 = MSE(f(A), truth) + sigma_B^2``. The second term is the same for every
method, so the distance to B ranks methods exactly as the (unknown) error against the truth
would; ``sigma_B^2`` is estimated from the scatter of B's 20 subs (per pixel, over 20) and
subtracted to give the error against the truth itself, and ``depth`` = 4 x MSE(A) / MSE(f(A))
says how many subs a plain stack would need to be as close.

Tuning is as fair as on simulated frames: each classical method (on the variance-stabilised
image, with the noise model measured on A, as subwatch measures it) gets the parameters that
bring split 1's A closest to split 1's B; splits 2-6 are the test. The network is not tuned.

The distance is reported over the whole image and over its faint region (see ``splits``).

    nice -n 15 python benchmarks/denoise/bench_real.py [--model denoiser.onnx] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from astropy.io import fits

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from methods import CLASSICAL, METHODS, network_method  # noqa: E402

from subwatch.calibration.apply import correct_pixels, find_outlier_pixels  # noqa: E402
from subwatch.enhance.vst import NoiseModel, estimate_noise_model  # noqa: E402
from subwatch.measure import measure_frame  # noqa: E402
from subwatch.register import find_transform, warp_image  # noqa: E402

DATA = HERE.parents[1] / ".." / "shared" / "data" / "real" / "jocular-arp186"
SPLIT = 4
#: Wider grids than on simulated frames: the noise model is measured, not known, and the
#: noise is correlated by the warp.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "bm3d": [{"scale": s} for s in (0.6, 0.8, 1.0, 1.25, 1.6)],
    "nlm": [{"h": h, "patch": p} for p in (5, 7) for h in (0.4, 0.6, 0.8, 1.0, 1.2)],
    "tv": [{"weight": w} for w in (0.25, 0.5, 1.0, 1.5, 2.5, 4.0)],
    "wavelet": [{"wavelet": w} for w in ("db1", "db2", "sym4")],
}


def load_subs(folder: Path) -> list[np.ndarray]:
    """The subs in capture order (L_1, L_2, ...), hot pixels replaced."""
    files = sorted(folder.glob("L_*.fit"), key=lambda p: int(p.stem.split("_")[1]))
    subs = []
    for path in files:
        img = fits.getdata(path).astype(np.float32)
        subs.append(correct_pixels(img, find_outlier_pixels(img)))
    return subs


def register(subs: list[np.ndarray]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """(n, H, W) subs on the first one's grid, sky-matched, and the box all of them cover."""
    ref = measure_frame(subs[0]).stars
    ref_xyf = np.column_stack([ref.x, ref.y, ref.flux])
    ref_sky = float(np.median(subs[0]))
    shape = subs[0].shape
    warped, common = [], np.ones(shape, bool)
    for img in subs:
        stars = measure_frame(img).stars
        reg = find_transform(np.column_stack([stars.x, stars.y, stars.flux]), ref_xyf)
        out, cover = warp_image(img, reg.matrix, shape, interpolation="cubic")
        out += np.float32(ref_sky - np.median(out[cover]))
        warped.append(out)
        common &= cover
    return np.stack(warped), inner_box(common, margin=4)


def inner_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """A rectangle inside ``mask`` (True everywhere), ``margin`` px in from its edges: the
    bounding box, shrunk on whichever side holds the most uncovered pixels until none is left.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    t, b, left, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    while not mask[t:b, left:r].all():
        sub = ~mask[t:b, left:r]
        sides = [sub[0].sum(), sub[-1].sum(), sub[:, 0].sum(), sub[:, -1].sum()]
        side = int(np.argmax(sides))
        t, b, left, r = t + (side == 0), b - (side == 1), left + (side == 2), r - (side == 3)
    return (slice(t + margin, b - margin), slice(left + margin, r - margin))


@dataclass
class Split:
    """A: the short stack; B: the deep one; ``faint``: where B, smoothed, is faint;
    ``var_b``: sigma_B^2 over all pixels and over the faint ones."""

    a: np.ndarray
    b: np.ndarray
    faint: np.ndarray
    var_b: float
    var_b_faint: float


def splits(stack: np.ndarray) -> list[Split]:
    """One ``Split`` per disjoint set of ``SPLIT`` subs.

    The faint region (sky and the galaxy's faint outskirts, about 98 % of the pixels) is
    where B smoothed by a 3-px Gaussian stays within 3 of B's noise sigmas of its median: it
    leaves out the stars and the galaxy's bright body, where differences of seeing between
    the subs of A and of B (not noise) dominate the distance. It is read from B alone.
    """
    n = stack.shape[0]
    out = []
    for k in range(n // SPLIT):
        a_idx = np.arange(k * SPLIT, (k + 1) * SPLIT)
        b_idx = np.setdiff1d(np.arange(n), a_idx)
        a = stack[a_idx].mean(axis=0).astype(np.float32)
        b = stack[b_idx].mean(axis=0).astype(np.float32)
        var = stack[b_idx].var(axis=0, ddof=1) / b_idx.size
        smooth = cv2.GaussianBlur(b, (0, 0), 3.0)
        faint = smooth < np.median(smooth) + 3.0 * np.sqrt(np.mean(var))
        out.append(Split(a, b, faint, float(np.mean(var)), float(np.mean(var[faint]))))
    return out


def distance(est: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = (np.asarray(est, np.float64) - b) ** 2
    return float(np.mean(d if mask is None else d[mask]))


def run_method(method: str, a: np.ndarray, nm: NoiseModel, params: dict, model: str | None):
    if method == "noisy":
        return a
    if method.startswith("network"):
        strength = 1.0 if method == "network" else float(method.split("@")[1])
        assert model is not None
        return network_method(model, strength=strength)(a, nm, None, {})
    return METHODS[method](a, nm, None, params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", help="ONNX model (default: the shipped one)")
    ap.add_argument("--methods", default="noisy,bm3d,nlm,tv,wavelet,network,network@0.8")
    ap.add_argument("--out", type=Path, default=Path("/tmp/subwatch-bench-denoise/real.json"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    model = None
    if any(m.startswith("network") for m in methods):
        from subwatch.enhance.denoise import load_network, shipped_model

        model = args.model or str(shipped_model())
        tag = load_network(Path(model)).metadata.get("version", Path(model).name)
    else:
        tag = None
    done: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}

    t0 = time.perf_counter()
    stack, box = register(load_subs(args.data))
    parts = splits(np.ascontiguousarray(stack[:, box[0], box[1]]))
    print(f"registered {stack.shape[0]} subs in {time.perf_counter() - t0:.1f} s; box {box}")

    tuned: dict[str, dict] = done.get("tuned", {})
    a, b = parts[0].a, parts[0].b
    nm = estimate_noise_model(a)
    for method in [m for m in methods if m in CLASSICAL and m not in tuned]:
        scores = [distance(run_method(method, a, nm, p, None), b) for p in GRIDS[method]]
        tuned[method] = GRIDS[method][int(np.argmin(scores))]
        print(f"tuned {method}: {tuned[method]} (grid distances {np.round(scores, 3)})")
    done["tuned"] = tuned

    results: dict[str, list[dict]] = done.get("results", {})
    for method in methods:
        name = f"{method} [{tag}]" if method.startswith("network") else method
        if name in results:
            continue
        rows = []
        for part in parts[1:]:
            nm = estimate_noise_model(part.a)
            t1 = time.perf_counter()
            est = run_method(method, part.a, nm, tuned.get(method, {}), model)
            rows.append(
                {
                    "distance": distance(est, part.b),
                    "sigma_b2": part.var_b,
                    "distance_faint": distance(est, part.b, part.faint),
                    "sigma_b2_faint": part.var_b_faint,
                    "seconds": time.perf_counter() - t1,
                }
            )
        results[name] = rows
        print(f"{name}: distance {np.mean([r['distance'] for r in rows]):.3f}", flush=True)
        done["results"] = results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=1))
    print(table(results, tuned))


def table(results: dict[str, list[dict]], tuned: dict[str, dict]) -> str:
    """Markdown: mean distance to B, error against the truth and equivalent depth, over the
    whole image and over the faint region."""
    lines = [
        "| method | distance to B | MSE vs truth | equiv. subs | faint: distance to B "
        "| faint: MSE vs truth | faint: equiv. subs | params |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def mean(rows: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    noisy = results.get("noisy", [])
    mse_a = mean(noisy, "distance") - mean(noisy, "sigma_b2") if noisy else np.nan
    faint_a = mean(noisy, "distance_faint") - mean(noisy, "sigma_b2_faint") if noisy else np.nan
    for name, rows in sorted(results.items(), key=lambda kv: mean(kv[1], "distance_faint")):
        d, df = mean(rows, "distance"), mean(rows, "distance_faint")
        mse = d - mean(rows, "sigma_b2")
        mse_f = df - mean(rows, "sigma_b2_faint")
        params = json.dumps(tuned.get(name.split(" ")[0], {}))
        lines.append(
            f"| {name} | {d:.1f} | {mse:.1f} | {SPLIT * mse_a / mse:.1f} | {df:.1f} "
            f"| {mse_f:.1f} | {SPLIT * faint_a / mse_f:.1f} | {params} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
