"""Sky gradient models against truth, beside photutils' Background2D; and the preview steps' cost.

Scenes are rendered from the simulator's separate components (sky glow, nebula, stars, in ADU)
plus Gaussian noise of a stack of about nine subs, so the glow each model should find is known:

* ``sky``: the nebula made for a frame half the size (off-centre), so the frame shows sky;
* ``filled``: the simulator's own framing, the nebula brighter than 1 % of the sky over ~90 %
  of the frame (an ill-posed case for any sky model: few boxes see only sky).

For each model: the residual (max - min over the frame of model - true glow, in 16 px blocks,
% of the sky level) and the share of the nebula's flux left above the model. Background2D runs
as photutils documents it (sigma-clipped median per box, 3x3 median filter of the boxes), with
boxes of 1/8 and 1/4 of the shorter side. Then, at 6248x4176, each preview step of ours is
timed (``time.perf_counter``, median of ``--repeat``) next to Background2D's fit.

    python benchmarks/bench_gradient.py                    # 640x480 scenes, then 26 MP
    python benchmarks/bench_gradient.py --seeds 5 12 31 --big-size 6248x4176 --repeat 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from subwatch.enhance.gradient import fit_gradient, remove_gradient
from subwatch.enhance.snr import stack_snr_report
from subwatch.enhance.stretch import auto_stretch, write_png
from subwatch.simulate import SimOptions, Simulation
from subwatch.simulate import sky as sim_sky

GAIN = 0.8
NOISE = 12.0


def render(width: int, height: int, seed: int, scene: str) -> dict[str, np.ndarray]:
    """Glow, nebula, stars (ADU) and their sum with noise, for one scene."""
    opts = SimOptions(
        out=Path(tempfile.gettempdir()), lights=1, width=width, height=height, seed=seed
    )
    sim = Simulation(opts)
    if scene == "sky":
        sim.nebula = sim_sky.make_nebula(
            np.random.default_rng([seed, 10]),
            sim.sky_bounds,
            (width // 2, height // 2),
            opts.nebula_peak * opts.sky_e_per_s,
        )
    parts = {"glow": (True, False, False), "nebula": (False, True, False)}
    parts["stars"] = (False, False, True)
    out = {
        name: sim.light_signal(0, glow=g, nebula=n, stars=s, transients=False)[0] / GAIN
        for name, (g, n, s) in parts.items()
    }
    noise = np.random.default_rng(seed).normal(0.0, NOISE, out["glow"].shape)
    out["image"] = (out["glow"] + out["nebula"] + out["stars"] + noise).astype(np.float32)
    return out


def score(model: np.ndarray, glow: np.ndarray, nebula: np.ndarray) -> tuple[float, float]:
    """(residual % of sky, nebula flux kept %)."""
    r = np.asarray(model, np.float64) - glow
    b = 16
    h, w = (s // b * b for s in r.shape)
    blocks = r[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
    residual = 100.0 * (blocks.max() - blocks.min()) / float(np.median(glow))
    kept = 100.0 * (1.0 - r.sum() / float(nebula.sum()))
    return float(residual), float(kept)


def background2d(image: np.ndarray, fraction: float) -> np.ndarray:
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground

    box = max(16, int(min(image.shape) * fraction))
    return Background2D(
        image,
        (box, box),
        filter_size=(3, 3),
        sigma_clip=SigmaClip(sigma=3.0),
        bkg_estimator=MedianBackground(),
    ).background


def models() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {
        "subwatch polynomial (order 2)": lambda im: fit_gradient(im).background,
        "subwatch rbf": lambda im: fit_gradient(im, method="rbf").background,
        "Background2D, box 1/8": lambda im: background2d(im, 1 / 8),
        "Background2D, box 1/4": lambda im: background2d(im, 1 / 4),
    }


def accuracy(seeds: list[int], width: int, height: int) -> None:
    print(f"\n### Accuracy, {width}x{height}, seeds {seeds}\n")
    print("| scene | model | residual % of sky, median / worst | nebula kept %, median / worst |")
    print("|---|---|---|---|")
    for scene in ("sky", "filled"):
        rendered = [render(width, height, s, scene) for s in seeds]
        for name, fit in models().items():
            res, kept = zip(
                *(score(fit(r["image"]), r["glow"], r["nebula"]) for r in rendered), strict=True
            )
            print(
                f"| {scene} | {name} | {statistics.median(res):.2f} / {max(res):.2f} "
                f"| {statistics.median(kept):.1f} / {min(kept):.1f} |"
            )


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def speed(width: int, height: int, repeat: int, seed: int) -> None:
    data = render(width, height, seed, "sky")
    image = data["image"]
    print(f"\n### Time per step, {width}x{height} mono, median of {repeat}\n")
    print("| step | seconds |")
    print("|---|---|")
    t_fit, model = timed(lambda: fit_gradient(image), repeat)
    t_rbf, _ = timed(lambda: fit_gradient(image, method="rbf"), repeat)
    t_rm, flat = timed(lambda: remove_gradient(image, model), repeat)
    t_snr, _ = timed(
        lambda: stack_snr_report(
            image,
            n_frames=9,
            sub_noises=[3 * NOISE] * 9,
            weights=None,
            integration_s=540.0,
            snr_history=[(60.0, 30.0), (300.0, 70.0)],
            target_snr=500.0,
            gradient=model,
        ),
        repeat,
    )
    t_st, stretched = timed(lambda: auto_stretch(flat), repeat)
    out = Path(tempfile.mkdtemp()) / "preview.png"
    t_png, _ = timed(lambda: write_png(out, stretched), repeat)
    t_b2d, _ = timed(lambda: background2d(image, 1 / 16), 1)
    rows = [
        ("fit_gradient, polynomial", t_fit),
        ("remove_gradient (subtract)", t_rm),
        ("stack_snr_report (SNR, noise, forecast, map)", t_snr),
        ("auto_stretch", t_st),
        ("write_png, 8 bit", t_png),
    ]
    for name, t in rows:
        print(f"| {name} | {t:.3f} |")
    print(f"| **together** | **{sum(t for _, t in rows):.3f}** |")
    print(f"| fit_gradient, rbf (instead of polynomial) | {t_rbf:.3f} |")
    print(f"| Background2D, box 1/16 (261 px), one run | {t_b2d:.3f} |")
    residual, kept = score(model.background, data["glow"], data["nebula"])
    print(f"\nAt this size: residual {residual:.2f} % of the sky, nebula kept {kept:.1f} %.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 12, 31])
    parser.add_argument("--size", default="640x480", help="accuracy scenes, WxH")
    parser.add_argument("--big-size", default="6248x4176", help="timing scene, WxH")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    w, h = (int(v) for v in args.size.split("x"))
    accuracy(args.seeds, w, h)
    if not args.skip_speed:
        bw, bh = (int(v) for v in args.big_size.split("x"))
        speed(bw, bh, args.repeat, args.seeds[0])


if __name__ == "__main__":
    main()
