"""Held-out simulated frames for the denoiser benchmarks: one noiseless sky, many depths.

A scene is a noiseless sky in photo-electrons per sub (sky glow, extended emission, stars),
and a frame is that scene observed as the mean of ``depth`` subs: Poisson noise on every
sub's signal plus Gaussian read noise, summed, divided by ``depth``, on a pedestal. The same
scene is observed at every depth, so faint structure comes out of the noise as depth grows,
as at the telescope. In ``correlated`` frames the noise is mixed by a random 2x2 bilinear
kernel of unit norm (what registration's interpolation does to a stack; per-pixel variance
kept).

Two families of scenes, so the network is not only judged on skies like those it learnt on:

* ``training``: the training generator's building blocks (``training.scenes``: fractal
  clouds, filaments, galaxies, power-law stars through a Moffat PSF), drawn from seeds
  ``[HELDOUT_SEED, 1, index]`` far from training's ``[7, iteration]`` and validation's
  ``[20260701, ...]``, and on 256-512 px patches where training saw 96 px;
* ``simulator``: ``subwatch.simulate``'s sky (its own nebula model, star catalogue, sky glow
  with a gradient), which the network never saw.

Each frame comes with its truth: the noiseless image, the stars alone and the sky alone
(for star photometry and faint-region masks), and the true noise model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from training.scenes import _correlate, extended_emission, moffat_otf, shift_kernel, star_field

from subwatch.enhance.vst import NoiseModel

HELDOUT_SEED = 424_242
PEDESTAL = 100.0  # ADU of the mean stack (1 ADU = 1 e- per sub)
#: Training-family emission and stars, in units of one sub's sky noise (before the PSF).
SIGNAL_SCALE = 0.25


@dataclass
class Scene:
    """A noiseless sky, e- per sub: ``clean`` = ``sky`` + emission + ``stars``."""

    family: str
    index: int
    clean: np.ndarray
    stars: np.ndarray
    sky: np.ndarray
    read_noise: float
    fwhm: float


@dataclass
class Frame:
    """A scene seen at ``depth`` subs: noisy and truth in ADU of the mean stack."""

    scene: Scene
    depth: int
    correlated: bool
    noisy: np.ndarray
    truth: np.ndarray
    noise_model: NoiseModel  # true: variance = gain * (x - offset) + sigma^2
    kernel: np.ndarray | None  # the correlation kernel (unit L2 norm), or None

    @property
    def sigma(self) -> float:
        """Noise std at the sky level, ADU."""
        return self.noise_model.sigma


def training_family(index: int, size: int = 256) -> Scene:
    """A sky from the training generator's blocks, on a held-out seed."""
    rng = np.random.default_rng([HELDOUT_SEED, 1, index])
    sky_level = float(np.exp(rng.uniform(np.log(20.0), np.log(2000.0))))
    rn = float(rng.uniform(1.0, 3.5))
    sigma1 = np.sqrt(sky_level + rn * rn)
    fwhm = float(rng.uniform(1.6, 5.0))
    otf = moffat_otf(size, fwhm, rng.uniform(2.2, 4.5), rng.uniform(0, 0.15), rng.uniform(0, np.pi))
    emission = extended_emission(rng, size) * sigma1 * SIGNAL_SCALE
    points = star_field(rng, size, fwhm) * sigma1 * SIGNAL_SCALE

    def blur(a: np.ndarray) -> np.ndarray:
        return np.maximum(np.fft.irfft2(np.fft.rfft2(a) * otf, s=(size, size)), 0.0)

    stars = blur(points)
    sky = np.full((size, size), sky_level)
    clean = sky + blur(emission) + stars
    return Scene("training", index, clean, stars, sky, rn, fwhm)


def simulator_family(index: int, size: int = 256) -> Scene:
    """A sky from ``subwatch.simulate`` (one light's expected signal, e- per sub)."""
    from subwatch.simulate import SimOptions, Simulation

    opts = SimOptions(
        out=Path(tempfile.gettempdir()) / "bench_denoise_sim",
        lights=1,
        width=size,
        height=size,
        seed=HELDOUT_SEED + index,
        calibration=False,
        nebula_peak=float(np.random.default_rng([HELDOUT_SEED, 2, index]).uniform(0.05, 1.0)),
    )
    sim = Simulation(opts)
    clean = sim.light_signal(0, transients=False)[0].astype(np.float64)
    stars = sim.light_signal(0, nebula=False, glow=False, transients=False)[0]
    sky = sim.light_signal(0, stars=False, nebula=False, transients=False)[0]
    return Scene(
        "simulator",
        index,
        clean,
        stars.astype(np.float64),
        sky.astype(np.float64),
        float(opts.read_noise_e),
        float(sim.plans[0].fwhm),
    )


def make_scene(family: str, index: int, size: int = 256) -> Scene:
    if family == "training":
        return training_family(index, size)
    if family == "simulator":
        return simulator_family(index, size)
    raise ValueError(f"unknown scene family {family!r}")


def observe(scene: Scene, depth: int, correlated: bool, seed: int) -> Frame:
    """The mean of ``depth`` subs of ``scene``, with fresh noise from ``seed``."""
    rng = np.random.default_rng([HELDOUT_SEED, 3, seed, depth, int(correlated)])
    lam = np.maximum(scene.clean, 0.0) * depth  # e- summed over the subs
    summed = rng.poisson(lam).astype(np.float64)
    summed += rng.normal(0.0, np.sqrt(depth) * scene.read_noise, lam.shape)
    noise = summed - lam
    kernel = shift_kernel(rng) if correlated else None
    if kernel is not None:
        noise = _correlate(noise, kernel)
    noisy = (lam + noise) / depth + PEDESTAL
    truth = scene.clean + PEDESTAL
    sky = float(np.median(scene.sky))
    nm = NoiseModel(
        gain=1.0 / depth,
        sigma=float(np.sqrt((sky + scene.read_noise**2) / depth)),
        offset=PEDESTAL + sky,
    )
    return Frame(scene, depth, correlated, noisy.astype(np.float32), truth, nm, kernel)
