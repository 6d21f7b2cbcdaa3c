"""PSF measurement and deconvolution: quality against the truth, beside scikit-image, and speed.

The test image is a stack as the simulator's truth makes it: the noiseless sky of a light
(stars with a Moffat PSF, nebula, sky glow; ``Simulation.light_signal``) averaged over
``--subs`` exposures, i.e. with shot and read noise shrunk by ``sqrt(subs)``, clipped at the
full well like the subs were, in ADU. The star list and the nebula are known, so:

* *FWHM*: ``measure_frame`` on the image before and after (median over the brightest
  isolated, unsaturated stars, Moffat fits), and the PSF's FWHM and beta against the truth;
* *flux*: aperture photometry (3 FWHM, sky between 4 and 6 FWHM) of isolated stars where the
  nebula is flat, output over input: median over the stars of SNR >= 20, and the worst and
  the share within 3 % over those of SNR >= 50;
* *rings*: around the brightest isolated stars, the deepest 1-px annulus median between 1
  and 6 FWHM below the sky around it, in sky-noise sigmas (unsaturated and saturated apart);
* *background noise*: standard deviation of star- and nebula-free sky (no star adds a tenth
  of the noise), output over input.

scikit-image's ``richardson_lucy`` gets the same PSF kernel and as many iterations as
subwatch used, on the same positive image (sky removed, the same pedestal added, scaled to a
maximum of 1, ``clip=False``).

``--ablation`` adds one run without each protection in turn (``ABLATIONS``), each with as
many iterations as the full run took. Speed is wall and CPU time (all threads) with the load
average, since this machine is shared.

    python benchmarks/bench_deconvolve.py        # quality at 2048x1536, speed at 6248x4176
    python benchmarks/bench_deconvolve.py --quality 3008x3008 --ablation --speed none
    python benchmarks/bench_deconvolve.py --quality none --skimage-speed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from scipy.spatial import cKDTree

import subwatch.enhance.deconvolve as dec
from subwatch.enhance.psf import PSFModel, measure_psf
from subwatch.measure import estimate_background, measure_frame
from subwatch.simulate import SimOptions, Simulation
from subwatch.simulate.sky import moffat_alpha, moffat_peak, render_stars

T = TypeVar("T")


@dataclass
class Scene:
    image: np.ndarray  # ADU, float32
    stars: np.ndarray  # noiseless star light, ADU
    nebula: np.ndarray  # noiseless nebula, ADU
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray  # ADU
    fwhm: float
    beta: float
    saturation: float  # ADU


def make_scene(width: int, height: int, subs: int, seed: int) -> Scene:
    opts = SimOptions(
        out=Path(tempfile.gettempdir()) / "bench_deconvolve",
        lights=1,
        width=width,
        height=height,
        seed=seed,
        calibration=False,
        seeing=(3.0, 3.0),
    )
    sim = Simulation(opts)
    plan = sim.plans[0]
    signal = sim.light_signal(0)[0]  # e- per sub
    nebula = sim.light_signal(0, stars=False, glow=False)[0]
    rng = np.random.default_rng(seed)
    var = (signal + opts.read_noise_e**2) / subs
    stack = np.minimum(
        signal + rng.standard_normal(signal.shape, np.float32) * np.sqrt(var), opts.full_well
    )
    gain = opts.gain
    cat = sim.star_catalogue()
    x = np.array([s["x"] for s in cat])
    y = np.array([s["y"] for s in cat])
    flux = np.array([s["flux"] for s in cat]) / gain
    stars = render_stars(stack.shape, x, y, flux, plan.fwhm, plan.beta, floor=0.01)
    return Scene(
        image=(stack / gain).astype(np.float32),
        stars=stars,
        nebula=(nebula / gain).astype(np.float32),
        x=x,
        y=y,
        flux=flux,
        fwhm=float(plan.fwhm),
        beta=float(plan.beta),
        saturation=opts.full_well / gain,
    )


def aperture_flux(img: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float) -> np.ndarray:
    out = []
    r_out = int(np.ceil(6 * fwhm)) + 1
    oy, ox = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
    for xi, yi in zip(x, y, strict=True):
        ix, iy = round(xi), round(yi)
        sub = img[iy - r_out : iy + r_out + 1, ix - r_out : ix + r_out + 1].astype(np.float64)
        rr = np.hypot(ox - (xi - ix), oy - (yi - iy))
        sky = np.median(sub[(rr >= 4 * fwhm) & (rr < 6 * fwhm)])
        out.append((sub[rr <= 3 * fwhm] - sky).sum())
    return np.array(out)


def ring_depth(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float, sigma: float
) -> np.ndarray:
    depths = []
    r_out = int(np.ceil(6 * fwhm)) + 8
    oy, ox = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
    for xi, yi in zip(x, y, strict=True):
        ix, iy = round(xi), round(yi)
        sub = img[iy - r_out : iy + r_out + 1, ix - r_out : ix + r_out + 1].astype(np.float64)
        rr = np.hypot(ox - (xi - ix), oy - (yi - iy))
        sky = np.median(sub[rr >= 6 * fwhm])
        profile = [
            np.median(sub[(rr >= a) & (rr < a + 1)]) - sky for a in np.arange(fwhm, 6 * fwhm)
        ]
        depths.append(-min(profile) / sigma)
    return np.array(depths)


def selections(scene: Scene, sigma: float) -> dict[str, np.ndarray]:
    """Isolated stars on flat nebula (photometry), and the brightest isolated ones (rings)."""
    h, w = scene.image.shape
    xy = np.column_stack([scene.x, scene.y])
    tree = cKDTree(xy)
    alpha = moffat_alpha(scene.fwhm, scene.beta)
    peak = moffat_peak(scene.flux, scene.fwhm, scene.beta)
    margin = 8 * scene.fwhm + 10
    inside = (
        (scene.x > margin) & (scene.x < w - margin) & (scene.y > margin) & (scene.y < h - margin)
    )
    isolated = np.zeros(scene.x.size, bool)
    flat = np.zeros(scene.x.size, bool)
    neb = cv2.blur(scene.nebula, (3, 3))
    for i in np.flatnonzero(inside & (peak > 3 * sigma)):
        near = [j for j in tree.query_ball_point(xy[i], 100.0) if j != i]
        dist = np.hypot(scene.x[near] - scene.x[i], scene.y[near] - scene.y[i])
        reach = np.maximum(dist - 6 * scene.fwhm, 0.0)
        light = peak[near] * (1 + (reach / alpha) ** 2) ** -scene.beta
        isolated[i] = bool((dist > 7 * scene.fwhm).all() and (light < 0.2 * sigma).all())
        ix, iy = round(scene.x[i]), round(scene.y[i])
        r = int(7 * scene.fwhm)
        flat[i] = float(np.std(neb[iy - r : iy + r + 1, ix - r : ix + r + 1])) < sigma
    saturated = peak >= scene.saturation
    bright = isolated & flat & (peak > 300 * sigma)
    return {
        "photometry": isolated & flat & ~saturated,
        "rings": bright & ~saturated,
        "rings_saturated": isolated & flat & saturated,
    }


def skimage_rl(image: np.ndarray, psf: PSFModel, iterations: int, sky: np.ndarray, sigma: float):
    from skimage.restoration import richardson_lucy

    positive = np.maximum(image - sky + np.float32(dec.PEDESTAL * sigma), np.float32(1e-3 * sigma))
    scale = float(positive.max())
    t0 = time.perf_counter()
    out = richardson_lucy(positive / scale, psf.kernel, num_iter=iterations, clip=False)
    seconds = time.perf_counter() - t0
    return (out * scale - dec.PEDESTAL * sigma + sky).astype(np.float32), seconds


#: What each protection is worth: the module settings changed for one run each.
ABLATIONS: dict[str, dict[str, object]] = {
    "without the local floor": {"FLOOR_SIGMA": 1e6},
    "without the signal mask (deconvolved everywhere)": {"_signal_mask": "ones"},
    "without TV (regularization 0)": {"regularization": 0.0},
    "pedestal 5 sigma instead of 30": {"PEDESTAL": 5.0},
    "towards a point, not the narrower Gaussian": {"TARGET_RATIO": 0.0, "MIN_TARGET_FWHM": 0.05},
    "without acceleration": {"ACCELERATION": 0.0},
}


@contextlib.contextmanager
def _settings(changes: dict[str, object]) -> Iterator[dict[str, object]]:
    """Set module constants of the deconvolver for a while; yields the keyword arguments."""
    saved, kwargs = {}, {}
    for name, value in changes.items():
        if name == "regularization":
            kwargs[name] = value
            continue
        saved[name] = getattr(dec, name)
        if value == "ones":
            value = lambda tile, s: np.ones_like(tile)  # noqa: E731
        setattr(dec, name, value)
    try:
        yield kwargs
    finally:
        for name, value in saved.items():
            setattr(dec, name, value)


def quality(width: int, height: int, subs: int, seed: int, skimage: bool, ablation: bool) -> None:
    scene = make_scene(width, height, subs, seed)
    bkg = estimate_background(scene.image)
    sigma = float(bkg.noise)
    sky = bkg.full(scene.image.shape).astype(np.float32)
    sel = selections(scene, sigma)
    t0 = time.perf_counter()
    psf = measure_psf(scene.image)
    psf_s = time.perf_counter() - t0
    assert psf is not None
    dec.deconvolve(scene.image[:256, :256], psf, max_iterations=2)  # compiled code warmed up
    ours = dec.deconvolve(scene.image, psf)
    results = {"subwatch": (ours.image, ours.seconds, ours.iterations)}
    if skimage:
        iterations = max(ours.iterations, 1)
        out, seconds = skimage_rl(scene.image, psf, iterations, sky, sigma)
        results["scikit-image"] = (out, seconds, iterations)
    if ablation:
        # As many iterations as the full run took, so each row shows what one protection does.
        fixed = {"max_iterations": max(ours.iterations, 1), "tolerance": 0.0}
        for name, changes in ABLATIONS.items():
            with _settings(changes) as kwargs:
                r = dec.deconvolve(scene.image, psf, **kwargs, **fixed)
            results[f"subwatch {name}"] = (r.image, r.seconds, r.iterations)
    no_star = cv2.erode((scene.stars < 0.1 * sigma).astype(np.uint8), np.ones((7, 7), np.uint8))
    free = no_star.astype(bool) & (scene.nebula < 0.5 * sigma)
    phot = sel["photometry"]
    before = aperture_flux(scene.image, scene.x[phot], scene.y[phot], scene.fwhm)
    snr = before / (sigma * np.sqrt(np.pi * (3 * scene.fwhm) ** 2))

    def rings(img: np.ndarray, key: str) -> float:
        if not sel[key].any():
            return float("nan")
        return float(ring_depth(img, scene.x[sel[key]], scene.y[sel[key]], scene.fwhm, sigma).max())

    m0 = measure_frame(scene.image)
    print(f"\n## quality: {width}x{height}, a {subs}-sub stack (seed {seed})")
    print(f"sky noise {sigma:.2f} ADU; star- and nebula-free sky: {free.mean():.1%} of the frame")
    print(
        f"PSF: FWHM {psf.fwhm:.3f} px (truth {scene.fwhm:.3f}), beta {psf.beta:.3f} "
        f"(truth {scene.beta:.3f}), ellipticity {psf.ellipticity:.3f}, {psf.n_stars} stars, "
        f"{psf_s:.2f} s"
    )
    print(f"subwatch stopped: {ours.stopped}")
    print(
        f"stars: {phot.sum()} for photometry ({(snr >= 20).sum()} of SNR >= 20, "
        f"{(snr >= 50).sum()} of SNR >= 50); {sel['rings'].sum()} bright and "
        f"{sel['rings_saturated'].sum()} saturated for rings"
    )
    print()
    print(
        "| method | iterations | FWHM (px) | change | flux out/in, median SNR>=20 | SNR>=50: "
        "worst, within 3 % | ring (sigma) | ring, saturated | sky noise out/in | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| input | | {m0.fwhm:.3f} | | | | {rings(scene.image, 'rings'):.2f} | "
        f"{rings(scene.image, 'rings_saturated'):.2f} | | |"
    )
    for name, (out, seconds, iterations) in results.items():
        m1 = measure_frame(out)
        ratio = aperture_flux(out, scene.x[phot], scene.y[phot], scene.fwhm) / before
        noise = np.std(out[free]) / np.std(scene.image[free])
        err = np.abs(ratio[snr >= 50] - 1)
        print(
            f"| {name} | {iterations} | {m1.fwhm:.3f} | {100 * (m1.fwhm / m0.fwhm - 1):+.1f}% | "
            f"{np.median(ratio[snr >= 20]):.4f} | {err.max():.4f}, {np.mean(err < 0.03):.0%} | "
            f"{rings(out, 'rings'):.2f} | {rings(out, 'rings_saturated'):.2f} | {noise:.3f} | "
            f"{seconds:.2f} |"
        )


def _timed(fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float, float]:
    """Run ``fn``; return its result, wall seconds and CPU seconds (all threads)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w0, time.process_time() - c0


def speed(
    width: int, height: int, subs: int, seed: int, repeat: int, skimage: bool, quick: bool
) -> None:
    scene = make_scene(width, height, subs, seed)
    image = scene.image
    del scene
    dec.deconvolve(image[:512, :512], measure_psf(image[:1024, :1024]) or _fallback())  # compile
    load = os.getloadavg()[0]
    print(f"\n## speed: {width}x{height} mono ({image.size / 1e6:.1f} MP), {subs}-sub stack")
    print(f"load average at the start: {load:.2f} (2 cores: above ~0.3 the timings are shared)")
    print("| step | wall s | CPU s | notes |")
    print("|---|---|---|---|")
    runs = [_timed(measure_psf, image) for _ in range(repeat)]
    psf, wall, cpu = min(runs, key=lambda r: r[1])
    assert psf is not None
    notes = f"FWHM {psf.fwhm:.3f}, beta {psf.beta:.2f}, {psf.n_stars} stars"
    print(f"| measure_psf | {wall:.2f} | {cpu:.2f} | {notes} |")
    runs = [_timed(dec.deconvolve, image, psf) for _ in range(repeat)]
    best, wall, cpu = min(runs, key=lambda r: r[1])
    print(f"| deconvolve | {wall:.2f} | {cpu:.2f} | {best.iterations} iterations, {best.stopped} |")
    if quick:
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        return
    grid, wall, cpu = _timed(measure_psf, image, grid=True)
    print(f"| measure_psf, 3x3 grid | {wall:.2f} | {cpu:.2f} | |")
    _, wall, cpu = _timed(dec.deconvolve, image, psf, max_iterations=20, tolerance=0.0)
    per = f"{wall / 20:.3f} s ({cpu / 20:.3f} CPU s) per iteration"
    print(f"| deconvolve, 20 iterations fixed | {wall:.2f} | {cpu:.2f} | {per} |")
    if grid is not None:
        g, wall, cpu = _timed(dec.deconvolve, image, grid)
        print(f"| deconvolve, 3x3 grid PSF | {wall:.2f} | {cpu:.2f} | {g.iterations} iterations |")
    if skimage:
        bkg = estimate_background(image)
        sky = bkg.full(image.shape).astype(np.float32)
        (_, seconds), wall, cpu = _timed(skimage_rl, image, psf, 20, sky, float(bkg.noise))
        print(f"| scikit-image richardson_lucy, 20 iterations | {seconds:.2f} | {cpu:.2f} | |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; peak RSS {rss:.2f} GB")


def _fallback() -> PSFModel:
    from subwatch.enhance.psf import moffat_kernel

    return PSFModel(kernel=moffat_kernel(25, 3.0, 3.5), fwhm=3.0, beta=3.5, n_stars=0)


def _size(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    w, h = text.lower().split("x")
    return int(w), int(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", default="2048x1536", help="WxH or none")
    parser.add_argument("--speed", default="6248x4176", help="WxH or none")
    parser.add_argument("--subs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-skimage", action="store_true", help="skip scikit-image in quality")
    parser.add_argument(
        "--ablation", action="store_true", help="also run without each protection in turn"
    )
    parser.add_argument(
        "--skimage-speed", action="store_true", help="time scikit-image at full size"
    )
    parser.add_argument(
        "--quick", action="store_true", help="speed: only measure_psf and deconvolve"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )
    q = _size(args.quality)
    if q:
        quality(*q, args.subs, args.seed, not args.no_skimage, args.ablation)
    s = _size(args.speed)
    if s:
        speed(*s, args.subs, args.seed, args.repeat, args.skimage_speed, args.quick)


if __name__ == "__main__":
    main()
