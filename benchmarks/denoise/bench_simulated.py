"""The denoiser against the classical methods on held-out simulated frames with known truth.

Frames (``heldout.py``): the same noiseless skies observed as stacks of 1, 4, 16, 64 and 256
subs, with white and with registration-correlated noise, from two scene families (the
training generator's blocks on held-out seeds, and subwatch's own simulator, which the
network never saw). Frames are 256x256 px: BM3D takes about 15 s per such frame on this
machine (about four minutes per 1024x1024).

Fair tuning: every classical method gets the true noise model (and BM3D the true noise
spectrum of correlated frames), works on the variance-stabilised image (``methods.py``),
and has its parameters chosen per depth and noise kind by a small grid search on separate
tuning frames (other skies, other noise), minimising the squared error in the stretched
(GAT) domain. The network gets none of this: it measures the noise model on the image, as
in use, at strength 1.

Scores (``metrics.py``): PSNR and SSIM stretched (GAT domain) and PSNR linear, faint-region
RMS error in noise sigmas, and star flux and FWHM ratios on isolated stars.

Results go to a cache (one JSON line per method and frame), so the network can be scored
later, or with another model, without running BM3D again::

    nice -n 15 python benchmarks/denoise/bench_simulated.py --methods classical
    python benchmarks/denoise/bench_simulated.py --methods network --model denoiser.onnx
    python benchmarks/denoise/bench_simulated.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # this folder, and the repo (``training``)

from heldout import Frame, make_scene, observe  # noqa: E402
from methods import CLASSICAL, GRIDS, METHODS, network_method  # noqa: E402
from metrics import image_scores, isolated_stars, star_scores  # noqa: E402

from subwatch.enhance.vst import forward  # noqa: E402

DEPTHS = (1, 4, 16, 64, 256)
FAMILIES = ("training", "simulator")
TUNE_BASE = 1000  # tuning skies are scenes 1000, 1001, ...: never test skies
DEFAULT_CACHE = Path("/tmp/subwatch-bench-denoise/simulated.jsonl")


class Cache:
    """Results as JSON lines keyed by what produced them; reruns skip what is done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.rows[row["key"]] = row

    @staticmethod
    def key(**parts: Any) -> str:
        return json.dumps(parts, sort_keys=True)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        row = {"key": key, **row}
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _frames(family: str, index: int, size: int) -> dict[tuple[int, bool], Frame]:
    scene = make_scene(family, index, size)
    return {(d, c): observe(scene, d, c, seed=index) for d in DEPTHS for c in (False, True)}


def gat_mse(frame: Frame, estimate: np.ndarray) -> float:
    nm = frame.noise_model
    return float(np.mean((forward(estimate, nm) - forward(frame.truth, nm)) ** 2))


def _frame_key(
    stage: str,
    family: str,
    index: int,
    depth: int,
    corr: bool,
    method: str,
    params: dict[str, Any],
    size: int,
    **extra: Any,
) -> str:
    """The cache key of one method's scores on one frame (``extra``: the test stage's model)."""
    return Cache.key(
        stage=stage,
        family=family,
        index=index,
        depth=depth,
        correlated=corr,
        method=method,
        params=params,
        size=size,
        **extra,
    )


def tune(
    cache: Cache, families: tuple[str, ...], n: int, size: int, depths, compute: bool = True
) -> dict:
    """Best parameters per (method, depth, correlated), by mean GAT MSE on tuning frames
    (with ``compute`` False, from what the cache holds; a setting not tuned yet is left out).
    """
    for index in range(TUNE_BASE, TUNE_BASE + n) if compute else ():
        for family in families:
            frames: dict | None = None
            for depth in depths:
                for corr in (False, True):
                    for method in CLASSICAL:
                        for params in GRIDS[method]:
                            key = _frame_key(
                                "tune", family, index, depth, corr, method, params, size
                            )
                            if cache.get(key) is not None:
                                continue
                            frames = frames or _frames(family, index, size)
                            frame = frames[(depth, corr)]
                            t0 = time.perf_counter()
                            est = METHODS[method](
                                frame.noisy, frame.noise_model, frame.kernel, params
                            )
                            seconds = time.perf_counter() - t0
                            cache.put(key, {"gat_mse": gat_mse(frame, est), "seconds": seconds})
                            print(f"tune {family} {depth} {corr} {method} {params}", flush=True)
    chosen: dict[str, Any] = {}
    for depth in depths:
        for corr in (False, True):
            for method in CLASSICAL:
                rows = [
                    [
                        cache.get(_frame_key("tune", f, i, depth, corr, method, params, size))
                        for f in families
                        for i in range(TUNE_BASE, TUNE_BASE + n)
                    ]
                    for params in GRIDS[method]
                ]
                if any(r is None for row in rows for r in row):
                    continue
                errors = [np.mean([r["gat_mse"] for r in row]) for row in rows]
                chosen[f"{method}|{depth}|{int(corr)}"] = GRIDS[method][int(np.argmin(errors))]
    return chosen


def score(frame: Frame, estimate: np.ndarray) -> dict[str, Any]:
    row: dict[str, Any] = image_scores(frame, estimate)
    row.update(star_scores(frame, estimate, isolated_stars(frame)))
    return row


def test(
    cache: Cache,
    methods: list[str],
    chosen: dict,
    families: tuple[str, ...],
    n: int,
    size: int,
    model: str | None,
    tag: str,
    depths,
    first: int = 0,
) -> None:
    for index in range(first, n):
        for family in families:
            frames = _frames(family, index, size)
            for (depth, corr), frame in frames.items():
                if depth not in depths:
                    continue
                for method in ["noisy", *methods]:
                    params = {}
                    if method in CLASSICAL:
                        params = chosen[f"{method}|{depth}|{int(corr)}"]
                    key = _frame_key(
                        "test",
                        family,
                        index,
                        depth,
                        corr,
                        method,
                        params,
                        size,
                        model=tag if method == "network" else None,
                    )
                    if cache.get(key) is not None:
                        continue
                    t0 = time.perf_counter()
                    if method == "noisy":
                        est = frame.noisy
                    elif method == "network":
                        assert model is not None
                        est = network_method(model)(frame.noisy, frame.noise_model, None, {})
                    else:
                        est = METHODS[method](frame.noisy, frame.noise_model, frame.kernel, params)
                    seconds = time.perf_counter() - t0
                    row = {
                        **score(frame, est),
                        "seconds": seconds,
                        "method": method,
                        "family": family,
                        "depth": depth,
                        "correlated": corr,
                        "params": params,
                        "model": tag if method == "network" else None,
                    }
                    cache.put(key, row)
                    print(f"test {family} {index} {depth:3d} {corr} {method}", flush=True)


def verify(cache: Cache, size: int) -> None:
    """Frames are regenerated for every run: check that they still are what the cached rows
    were scored on (the noisy input's scores, recomputed for one frame of each family)."""
    for family in FAMILIES:
        frame = _frames(family, 0, size)[(DEPTHS[0], False)]
        key = _frame_key("test", family, 0, DEPTHS[0], False, "noisy", {}, size, model=None)
        row = cache.get(key)
        if row is not None and abs(row["psnr_gat"] - score(frame, frame.noisy)["psnr_gat"]) > 1e-6:
            raise SystemExit(f"the {family} frames changed since they were cached: start afresh")


def _mean(rows: list[dict], field: str) -> float:
    vals = [r[field] for r in rows if r.get(field) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _pooled(rows: list[dict], field: str) -> str:
    """Median ratio over the stars of all frames, and how many stars."""
    vals = [v for r in rows for v in r.get(field, [])]
    return f"{np.median(vals):.3f} (n={len(vals)})" if vals else "-"


def report(cache: Cache, chosen: dict, tag: str | None, depths) -> str:
    """Markdown tables: per depth, every method's scores; network minus best classical."""
    rows = [r for r in cache.rows.values() if json.loads(r["key"])["stage"] == "test"]
    rows = [r for r in rows if r["method"] != "network" or r["model"] == tag]
    names = ["noisy", *CLASSICAL] + (["network"] if tag else [])
    # Only frames every method was scored on, so every column averages the same frames.
    by_frame: dict[tuple, set[str]] = {}
    for r in rows:
        k = json.loads(r["key"])
        by_frame.setdefault((k["family"], k["index"], k["depth"], k["correlated"]), set()).add(
            r["method"]
        )
    complete = {f for f, got in by_frame.items() if set(names) <= got}
    rows = [
        r
        for r in rows
        if (r["family"], json.loads(r["key"])["index"], r["depth"], r["correlated"]) in complete
    ]
    out = [f"Frames scored by every method: {len(complete)}\n"]
    fields = (
        ("psnr_gat", "PSNR str."),
        ("ssim_gat", "SSIM str."),
        ("psnr_linear", "PSNR lin."),
        ("faint_rms", "faint RMS"),
        ("flux", "star flux"),
        ("fwhm", "FWHM"),
    )
    out.append("| subs | noise | " + " | ".join(names) + " | network - best classical |")
    out.append("|---" * (len(names) + 3) + "|")
    gains = []
    for depth in depths:
        for corr in (False, True):
            sel = [r for r in rows if r["depth"] == depth and r["correlated"] == corr]
            psnr = {m: _mean([r for r in sel if r["method"] == m], "psnr_gat") for m in names}
            best = max(CLASSICAL, key=lambda m: psnr[m] if np.isfinite(psnr[m]) else -np.inf)
            gain = psnr["network"] - psnr[best] if tag else float("nan")
            gains.append(gain)
            cells = " | ".join(f"{psnr[m]:.2f}" for m in names)
            kind = "correlated" if corr else "white"
            out.append(f"| {depth} | {kind} | {cells} | {gain:+.2f} dB vs {best} |")
    out.append(f"\nMean network - best classical (stretched PSNR): {np.nanmean(gains):+.2f} dB\n")
    out.append("Per depth, white and correlated frames together, both families:\n")
    out.append("| subs | method | " + " | ".join(f[1] for f in fields) + " | s/frame |")
    out.append("|---" * (len(fields) + 3) + "|")
    for depth in depths:
        for m in names:
            sel = [r for r in rows if r["depth"] == depth and r["method"] == m]
            cells = [f"{_mean(sel, f[0]):.3f}" for f in fields[:4]]
            cells += [_pooled(sel, "flux_ratios"), _pooled(sel, "fwhm_ratios")]
            out.append(f"| {depth} | {m} | {' | '.join(cells)} | {_mean(sel, 'seconds'):.2f} |")
    lin = {m: _mean([r for r in rows if r["method"] == m], "psnr_linear") for m in names}
    out.append(
        "\nMean linear PSNR over all frames: " + ", ".join(f"{m} {v:.2f}" for m, v in lin.items())
    )
    out.append("\nChosen parameters (method | subs | correlated): " + json.dumps(chosen))
    return "\n".join(out)


#: Colour frames: sky, emission (hydrogen-alpha red with some OIII) and star colours, R G B.
SKY_RGB = np.array([1.0, 1.1, 0.9])
EMISSION_RGB = np.array([1.0, 0.35, 0.45])
STAR_RGB = np.array([1.0, 0.8, 0.6])


def colour_frame(index: int, depth: int, size: int) -> tuple[np.ndarray, np.ndarray, list]:
    """An RGB stack (H, W, 3) of a training-family sky, its truth and true noise models."""
    from heldout import PEDESTAL, make_scene

    from subwatch.enhance.vst import NoiseModel

    scene = make_scene("training", index, size)
    emission = scene.clean - scene.sky - scene.stars
    rng = np.random.default_rng([424_242, 4, index, depth])
    truth, noisy, models = [], [], []
    for c in range(3):
        lam = scene.sky * SKY_RGB[c] + emission * EMISSION_RGB[c] + scene.stars * STAR_RGB[c]
        counts = rng.poisson(np.maximum(lam, 0) * depth).astype(np.float64)
        counts += rng.normal(0.0, np.sqrt(depth) * scene.read_noise, lam.shape)
        truth.append(lam + PEDESTAL)
        noisy.append(counts / depth + PEDESTAL)
        sky = float(np.median(scene.sky)) * SKY_RGB[c]
        models.append(
            NoiseModel(1.0 / depth, np.sqrt((sky + scene.read_noise**2) / depth), PEDESTAL + sky)
        )
    return np.stack(noisy, 2).astype(np.float32), np.stack(truth, 2), models


def colour_comparison(model: str, frames: int, size: int, depths) -> str:
    """Luminance through the network with guided-filtered chroma, against every channel
    through it: stretched PSNR per channel, chroma error, seconds."""
    from subwatch.enhance.denoise import Denoiser, DenoiseSettings, load_network

    net = load_network(Path(model))
    lines = [
        "| subs | colour | PSNR str. (mean of R, G, B) | chroma RMS (R-G, B-G; sigmas) | s |",
        "|---|---|---|---|---|",
    ]
    for depth in depths:
        for mode in ("noisy", "luminance", "channels"):
            psnr, chroma, secs = [], [], []
            for index in range(frames):
                noisy, truth, models = colour_frame(index, depth, size)
                t0 = time.perf_counter()
                if mode == "noisy":
                    est = noisy
                else:
                    den = Denoiser(net, DenoiseSettings(strength=1.0, colour=mode))
                    est = den(noisy)
                secs.append(time.perf_counter() - t0)
                for c in range(3):
                    gt, ge = forward(truth[:, :, c], models[c]), forward(est[:, :, c], models[c])
                    peak = float(np.percentile(gt, 99.9) - np.median(gt))
                    psnr.append(10 * np.log10(peak**2 / np.mean((ge - gt) ** 2)))
                sig = models[1].sigma
                for a, b in ((0, 1), (2, 1)):
                    err = (est[:, :, a] - est[:, :, b]) - (truth[:, :, a] - truth[:, :, b])
                    chroma.append(np.sqrt(np.mean(err**2)) / sig)
            lines.append(
                f"| {depth} | {mode} | {np.mean(psnr):.2f} | {np.mean(chroma):.3f} "
                f"| {np.mean(secs):.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="classical", help="classical, network, or a list")
    ap.add_argument("--model", help="ONNX model for the network (default: the shipped one)")
    ap.add_argument("--frames", type=int, default=3, help="test skies per family")
    ap.add_argument("--first", type=int, default=0, help="first test sky (to split a run)")
    ap.add_argument("--tune-frames", type=int, default=1, help="tuning skies per family")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--report", action="store_true", help="only print the tables")
    ap.add_argument("--colour", action="store_true", help="only the colour comparison")
    args = ap.parse_args()
    depths = tuple(int(d) for d in args.depths.split(","))
    cache = Cache(args.cache)
    if args.methods == "classical":
        methods = list(CLASSICAL)
    elif args.methods == "network":
        methods = ["network"]
    else:
        methods = args.methods.split(",")
    model, tag = None, None
    if "network" in methods or args.model:
        from subwatch.enhance.denoise import load_network, shipped_model

        model = args.model or str(shipped_model())
        net = load_network(Path(model))
        tag = net.metadata.get("version", Path(model).name)
    if args.colour:
        from subwatch.enhance.denoise import shipped_model

        print(colour_comparison(args.model or str(shipped_model()), args.frames, 256, depths))
        return
    verify(cache, args.size)
    classical = [m for m in methods if m in CLASSICAL]
    compute = bool(classical) and not args.report
    chosen = tune(cache, FAMILIES, args.tune_frames, args.size, depths, compute)
    if not args.report:
        test(
            cache, methods, chosen, FAMILIES, args.frames, args.size, model, tag, depths, args.first
        )
    print(report(cache, chosen, tag, depths))


if __name__ == "__main__":
    main()
