"""The denoisers compared, each a function ``(noisy ADU, noise model, kernel, params) -> ADU``.

Classical methods get every advantage the network does not: the *true* noise model, and for
correlated noise BM3D gets the true noise power spectrum. They all work where they work best,
on the variance-stabilised image (generalised Anscombe transform with the true model, unit
noise; for correlated noise the per-pixel std is still 1, as the kernel has unit norm), and
come back through the exact unbiased inverse:

* ``bm3d``: the ``bm3d`` package (4.0.3), profile ``np``, both stages, ``sigma_psd`` = the
  true std (white) or the true PSD (correlated), times a tuned factor;
* ``nlm``: scikit-image ``denoise_nl_means``, fast mode, ``sigma`` = 1, tuned ``h`` (in
  units of sigma) and patch size, search distance 6;
* ``tv``: scikit-image ``denoise_tv_chambolle``, tuned weight;
* ``wavelet``: scikit-image ``denoise_wavelet``, BayesShrink, soft thresholds, ``sigma`` = 1,
  tuned wavelet.

``GRIDS`` are the tuning grids; ``bench_simulated`` picks, per depth and noise kind, the
setting with the lowest error on separate tuning frames. The network runs as subwatch runs
it (``subwatch.enhance.denoise``): noise model measured on the image itself, whole-image
normalisation, tiles, star cores kept; strength 1 unless said.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from subwatch.enhance.vst import NoiseModel, forward, inverse

if not hasattr(np, "trapz"):  # bm3d's PSD path calls np.trapz, gone in numpy 2.4
    np.trapz = np.trapezoid  # type: ignore[attr-defined]

Params = dict[str, Any]
Method = Callable[[np.ndarray, NoiseModel, np.ndarray | None, Params], np.ndarray]

GRIDS: dict[str, list[Params]] = {
    "bm3d": [{"scale": s} for s in (1.0, 1.25, 1.6)],
    "nlm": [{"h": h, "patch": p} for p in (5, 7) for h in (0.5, 0.7, 0.9, 1.1)],
    "tv": [{"weight": w} for w in (0.25, 0.5, 1.0, 1.5, 2.5, 4.0)],
    "wavelet": [{"wavelet": w} for w in ("db1", "db2", "sym4")],
}
CLASSICAL = tuple(GRIDS)


def _in_gat(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    """Wrap a unit-noise denoiser: transform with the true model, denoise, invert."""

    def run(noisy: np.ndarray, nm: NoiseModel) -> np.ndarray:
        z = forward(noisy, nm).astype(np.float64)
        return inverse(fn(z), nm)

    return run


def psd_of(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Noise power spectrum of unit white noise convolved with ``kernel``, as bm3d wants it."""
    return np.abs(np.fft.fft2(kernel, shape)) ** 2 * shape[0] * shape[1]


def bm3d_method(
    noisy: np.ndarray, nm: NoiseModel, kernel: np.ndarray | None, p: Params
) -> np.ndarray:
    import bm3d

    def fn(z: np.ndarray) -> np.ndarray:
        if kernel is None:
            sigma: Any = float(p["scale"])
        else:
            sigma = psd_of(kernel, z.shape) * float(p["scale"]) ** 2
        return np.asarray(bm3d.bm3d(z, sigma), np.float64)

    return _in_gat(fn)(noisy, nm)


def nlm_method(
    noisy: np.ndarray, nm: NoiseModel, kernel: np.ndarray | None, p: Params
) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    def fn(z: np.ndarray) -> np.ndarray:
        return denoise_nl_means(
            z,
            patch_size=int(p["patch"]),
            patch_distance=6,
            h=float(p["h"]),
            sigma=1.0,
            fast_mode=True,
            preserve_range=True,
        )

    return _in_gat(fn)(noisy, nm)


def tv_method(
    noisy: np.ndarray, nm: NoiseModel, kernel: np.ndarray | None, p: Params
) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return _in_gat(lambda z: denoise_tv_chambolle(z, weight=float(p["weight"])))(noisy, nm)


def wavelet_method(
    noisy: np.ndarray, nm: NoiseModel, kernel: np.ndarray | None, p: Params
) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    def fn(z: np.ndarray) -> np.ndarray:
        return denoise_wavelet(
            z, sigma=1.0, wavelet=str(p["wavelet"]), mode="soft", method="BayesShrink"
        )

    return _in_gat(fn)(noisy, nm)


@lru_cache(maxsize=2)
def _network(model: str, threads: int) -> Any:
    from subwatch.enhance.denoise import load_network

    return load_network(Path(model), threads)


def network_method(model: str, threads: int = 2, strength: float = 1.0) -> Method:
    """The shipped pipeline, on its own: it measures the noise model itself."""
    from subwatch.enhance.denoise import Denoiser, DenoiseSettings

    denoiser = Denoiser(_network(model, threads), DenoiseSettings(strength=strength))

    def run(noisy: np.ndarray, nm: NoiseModel, kernel: np.ndarray | None, p: Params) -> np.ndarray:
        return denoiser(noisy)

    return run


METHODS: dict[str, Method] = {
    "bm3d": bm3d_method,
    "nlm": nlm_method,
    "tv": tv_method,
    "wavelet": wavelet_method,
}
