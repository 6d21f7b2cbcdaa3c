"""Synthetic training scenes: linear astro stacks with known truth, from our own physics.

A scene is built in photo-electrons summed over ``depth`` subs (so its noise is exact), then
scaled to ADU of a mean stack with a pedestal, like a real stack on disk:

* **sky**: 20-2000 e- per sub, with a linear/quadratic gradient across the patch;
* **extended emission**, everything in units of the sky's stack noise (0.5-200 sigma):
  fractal clouds (fractional Brownian motion, spectral slope 2-3.6, exponentiated, under an
  envelope), filaments (the zero-crossings of another fBm field), exponential-disc galaxies;
* **stars**: density 10^-3.3..10^-1.6 per pixel, power-law fluxes from 3 sigma x FWHM^2;
* everything through one **Moffat PSF** (FWHM 1.6-5 px, beta 2.2-4.5, ellipticity <= 0.15);
* **depth**: the signal above is then multiplied by a factor log-uniform in 1..sqrt(depth),
  because a real stack of N subs sees the same sky at sqrt(N) times the signal-to-noise;
* **saturated cores**: sometimes the stack is clipped at a level a few stars exceed;
* **noise**: Poisson on the signal plus Gaussian read noise of every sub, for 1..500 subs;
  residual hot pixels; in half the samples spatially correlated by a random bilinear
  sub-pixel-shift kernel (what registration interpolation does), variance preserved;
  sometimes a region of reduced coverage (a dithered edge) where the noise is higher and the
  noise map says so.

``make_sample`` returns the network's view: channel 0 is the generalised Anscombe transform
(``subwatch.enhance.vst.forward``) of the noisy stack minus its median, channel 1 the noise map,
and the target is the transform of the clean stack minus the same median. The transform uses a
noise model mis-estimated by up to +-15 %, as ``estimate_noise_model`` will be on real data.
Everything follows from a ``numpy.random.Generator``: a seed reproduces the data exactly.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from subwatch.enhance.vst import NoiseModel, forward

MIN_DEPTH = 1
MAX_DEPTH = 500


@dataclass
class Sample:
    """One training example and the facts behind it (units: ADU of the mean stack)."""

    inputs: np.ndarray  # (2, H, W) float32: GAT(noisy) - c, noise map
    target: np.ndarray  # (1, H, W) float32: GAT(clean) - c
    noisy: np.ndarray  # (H, W) float32, ADU
    clean: np.ndarray  # (H, W) float32, ADU
    model: NoiseModel  # the (mis-estimated) model the transform used
    true_model: NoiseModel
    centre: float  # c, the median of GAT(noisy)
    depth: int
    defects: np.ndarray  # (H, W) bool: residual hot pixels (not noise a metric should count)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _freq(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return np.hypot(fy, fx)


def fbm(rng: np.random.Generator, size: int, slope: float) -> np.ndarray:
    """Fractional Brownian motion field (power ~ f^-slope), zero mean, unit std."""
    f = _freq(size)
    f[0, 0] = 1.0
    amp = f ** (-slope / 2.0)
    amp[0, 0] = 0.0
    spec = amp * (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape))
    field = np.fft.irfft2(spec, s=(size, size))
    return (field - field.mean()) / (field.std() + 1e-12)


def moffat_otf(size: int, fwhm: float, beta: float, ellipticity: float, angle: float) -> np.ndarray:
    """Real FFT of a unit-sum Moffat PSF centred at the origin (periodic), for convolution."""
    c = np.fft.fftfreq(size) * size  # pixel offsets 0, 1, ..., -1
    y, x = np.meshgrid(c, c, indexing="ij")
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x * ca + y * sa) / (1.0 - ellipticity)
    v = -x * sa + y * ca
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    psf = (1.0 + (u * u + v * v) / alpha**2) ** (-beta)
    psf /= psf.sum()
    return np.fft.rfft2(psf)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return y, x


def extended_emission(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clouds, filaments and galaxies, in units of the sky's stack noise (before the PSF)."""
    y, x = _grid(size)
    out = np.zeros((size, size))
    if rng.random() < 0.6:  # fractal cloud under an envelope
        f = fbm(rng, size, rng.uniform(2.0, 3.6))
        cloud = np.exp(rng.uniform(0.5, 2.0) * f)
        cloud = (cloud - cloud.min()) / (cloud.max() - cloud.min() + 1e-12)
        if rng.random() < 0.5:
            cy, cx = rng.uniform(-0.3, 1.3, 2) * size
            r = rng.uniform(0.3, 1.5) * size
            cloud *= np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        out += _log_uniform(rng, 0.5, 200.0) * cloud
    if rng.random() < 0.4:  # filaments: thin ridges along the zero set of an fBm field
        g = fbm(rng, size, rng.uniform(2.5, 3.6))
        width = rng.uniform(0.03, 0.15)
        fil = np.exp(-((g / width) ** 2))
        fil *= 0.5 + 0.5 * (fbm(rng, size, 3.0) > rng.uniform(-1.0, 0.5))
        out += _log_uniform(rng, 0.5, 50.0) * fil
    if rng.random() < 0.4:  # exponential-disc galaxies
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(-0.1, 1.1, 2) * size
            scale = _log_uniform(rng, 1.5, 30.0)
            q = rng.uniform(0.3, 1.0)
            a = rng.uniform(0, np.pi)
            u = (x - cx) * np.cos(a) + (y - cy) * np.sin(a)
            v = (-(x - cx) * np.sin(a) + (y - cy) * np.cos(a)) / q
            out += _log_uniform(rng, 1.0, 300.0) * np.exp(-np.hypot(u, v) / scale)
    return out


def star_field(rng: np.random.Generator, size: int, fwhm: float) -> np.ndarray:
    """Point sources splatted bilinearly at sub-pixel positions, flux in sigma x px units."""
    density = 10 ** rng.uniform(-3.3, -1.6)
    n = rng.poisson(density * size * size)
    img = np.zeros((size, size))
    if n == 0:
        return img
    index = rng.uniform(1.6, 2.2)
    fmin = 3.0 * fwhm * fwhm
    flux = fmin * rng.uniform(1e-6, 1.0, n) ** (-1.0 / (index - 1.0))
    flux = np.minimum(flux, fmin * 1e5)
    py, px = rng.uniform(0, size, n), rng.uniform(0, size, n)
    iy, ix = np.floor(py).astype(int), np.floor(px).astype(int)
    dy, dx = py - iy, px - ix
    for oy, ox, w in (
        (0, 0, (1 - dy) * (1 - dx)),
        (0, 1, (1 - dy) * dx),
        (1, 0, dy * (1 - dx)),
        (1, 1, dy * dx),
    ):
        np.add.at(img, ((iy + oy) % size, (ix + ox) % size), flux * w)
    return img


def shift_kernel(rng: np.random.Generator) -> np.ndarray:
    """2x2 bilinear interpolation kernel of a random sub-pixel shift, unit L2 norm."""
    dy, dx = rng.uniform(0, 1, 2)
    k = np.array([[(1 - dy) * (1 - dx), (1 - dy) * dx], [dy * (1 - dx), dy * dx]])
    return k / np.sqrt((k * k).sum())


def _correlate(noise: np.ndarray, k: np.ndarray) -> np.ndarray:
    out = np.zeros_like(noise)
    for oy in range(2):
        for ox in range(2):
            out += k[oy, ox] * np.roll(noise, (oy, ox), axis=(0, 1))
    return out


def coverage_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise multiplier: 1 at full depth, 1/sqrt(f) where only a fraction f of subs covers."""
    m = np.ones((size, size))
    if rng.random() < 0.3:
        y, x = _grid(size)
        a = rng.uniform(0, 2 * np.pi)
        d = (x - size / 2) * np.cos(a) + (y - size / 2) * np.sin(a)
        edge = d > rng.uniform(-0.4, 0.4) * size
        m[edge] = 1.0 / np.sqrt(rng.uniform(0.05, 0.9))
    return m


def make_sample(rng: np.random.Generator, size: int = 96, depth: int | None = None) -> Sample:
    """One scene with fresh noise; ``depth`` (subs) is drawn log-uniform in 1..500 if None."""
    if depth is None:
        depth = round(_log_uniform(rng, MIN_DEPTH, MAX_DEPTH + 0.5))
    depth = int(np.clip(depth, MIN_DEPTH, MAX_DEPTH))
    sky = _log_uniform(rng, 20.0, 2000.0)  # e- per sub
    rn = rng.uniform(1.0, 3.5)  # e- per sub
    sky_sigma = np.sqrt(depth * (sky + rn * rn))  # stack noise at the sky, e- (summed)

    fwhm = rng.uniform(1.6, 5.0)
    otf = moffat_otf(size, fwhm, rng.uniform(2.2, 4.5), rng.uniform(0, 0.15), rng.uniform(0, np.pi))
    scene = extended_emission(rng, size) + star_field(rng, size, fwhm)
    scene = np.maximum(np.fft.irfft2(np.fft.rfft2(scene) * otf, s=(size, size)), 0.0)
    # Amplitudes above are in stack sigmas, which would keep a scene's contrast the same at
    # every depth; a real stack sees the same sky at sqrt(N) times the signal-to-noise, so
    # deep stacks are drawn with up to sqrt(depth) times the contrast (docs/decisions.md).
    scene *= _log_uniform(rng, 1.0, float(np.sqrt(depth)))

    y, x = _grid(size)
    t = (x - size / 2) / size, (y - size / 2) / size
    grad = _log_uniform(rng, 3e-4, 3e-2)
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(a) * t[0] + np.sin(a) * t[1] + rng.uniform(-1, 1) * (t[0] ** 2 + t[1] ** 2)
    sky_map = depth * sky * (1.0 + grad * ramp)
    clean = sky_map + scene * sky_sigma  # e-, summed over subs

    cover = coverage_map(rng, size)
    counts = rng.poisson(clean).astype(np.float64)
    noise = counts - clean + rng.normal(0.0, np.sqrt(depth) * rn, clean.shape)
    hot = np.zeros(clean.shape, dtype=bool)
    if rng.random() < 0.5:  # residual hot pixels / cosmic rays the rejection missed
        hot = rng.random(clean.shape) < 10 ** rng.uniform(-4, -2.5)
        noise[hot] += sky_sigma * 10 ** rng.uniform(np.log10(5), np.log10(500), hot.sum())
    if rng.random() < 0.5:  # registration interpolation
        k = shift_kernel(rng)
        noise = _correlate(noise, k)
        hot = _correlate(hot.astype(np.float64), k) > 0
    noisy = clean + noise * cover

    if rng.random() < 0.3:  # saturated cores: the stack is flat above the full well
        sat = depth * sky + _log_uniform(rng, 100.0, 1e4) * sky_sigma
        clean = np.minimum(clean, sat)
        noisy = np.minimum(noisy, sat)

    # to ADU of a mean stack with a pedestal
    scale = _log_uniform(rng, 0.05, 2.0) / depth
    pedestal = rng.uniform(0.0, 1000.0)
    clean_adu = clean * scale + pedestal
    noisy_adu = noisy * scale + pedestal
    offset = float(np.median(sky_map)) * scale + pedestal
    true_nm = NoiseModel(gain=scale, sigma=float(sky_sigma * scale), offset=offset)
    est_nm = NoiseModel(
        gain=true_nm.gain * (1 + rng.uniform(-0.15, 0.15)),
        sigma=true_nm.sigma * (1 + rng.uniform(-0.15, 0.15)),
        offset=offset + rng.uniform(-0.5, 0.5) * true_nm.sigma,
    )

    z = forward(noisy_adu, est_nm)
    c = float(np.median(z))
    inputs = np.stack([z - c, cover.astype(np.float32)]).astype(np.float32)
    target = (forward(clean_adu, est_nm) - c)[None].astype(np.float32)
    return Sample(
        inputs=inputs,
        target=target,
        noisy=noisy_adu.astype(np.float32),
        clean=clean_adu.astype(np.float32),
        model=est_nm,
        true_model=true_nm,
        centre=c,
        depth=depth,
        defects=hot,
    )


def make_batch(
    rng: np.random.Generator, batch: int, size: int = 96
) -> tuple[np.ndarray, np.ndarray]:
    """A training batch (inputs (B, 2, H, W), targets (B, 1, H, W)), with random flips."""
    xs, ts = [], []
    for _ in range(batch):
        s = make_sample(rng, size)
        k = int(rng.integers(4))
        inp, tgt = np.rot90(s.inputs, k, axes=(1, 2)), np.rot90(s.target, k, axes=(1, 2))
        if rng.random() < 0.5:
            inp, tgt = inp[:, :, ::-1], tgt[:, :, ::-1]
        xs.append(inp)
        ts.append(tgt)
    return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ts))


def draw_batch(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The batch of iteration ``it``: a function of (seed, it) alone, in whichever process."""
    seed, it, batch, size = job
    return make_batch(np.random.default_rng([seed, it]), batch, size)


def batches(
    seed: int, start: int, stop: int, batch: int, size: int, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``start..stop-1`` in order; with ``workers`` > 0 drawn ahead in a process pool.

    Drawing a batch of synthetic scenes costs about 0.2 s of one core, far more than a
    training step on a GPU: there the scenes come from the other cores, at most two batches
    per worker ahead so memory stays bounded. The batches are the same either way.
    """
    if workers <= 0:
        for it in range(start, stop):
            yield draw_batch((seed, it, batch, size))
        return
    ctx = multiprocessing.get_context("spawn")  # no forked copy of a CUDA context
    with ctx.Pool(workers) as pool:
        ahead: deque = deque()
        nxt = start
        for _ in range(start, stop):
            while nxt < stop and len(ahead) < 2 * workers:
                ahead.append(pool.apply_async(draw_batch, ((seed, nxt, batch, size),)))
                nxt += 1
            yield ahead.popleft().get()
