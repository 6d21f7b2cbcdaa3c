"""The camera and optics: everything calibration frames exist to remove.

One ``Camera`` object, built once per seed, turns expected electrons into 16-bit ADU for every
kind of frame, lights and calibration alike. That is the point: the bias pattern, the hot
pixels and the dust donuts in a light are the very same arrays that appear in the bias, dark
and flat frames, so a correct calibration removes them and a wrong one visibly does not.

The chain follows the physics of a cooled CMOS sensor. Light is attenuated by the optics
(vignetting, out-of-focus dust shadows) and by pixel-to-pixel sensitivity (PRNU); thermal
electrons add at a rate that doubles every ~6 C, with a fixed sprinkling of hot and warm
pixels; the total is Poisson-distributed, capped at the full well, read out with Gaussian
read noise, divided by the gain, put on a bias pedestal with column and row structure, and
rounded and clipped to 16 bits.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

DARK_REFERENCE_TEMP = -10.0  # C at which ``dark_e_per_s`` is specified
DARK_DOUBLING_C = 6.0


@dataclass
class Camera:
    """A sensor plus the optics in front of it; all maps are (H, W) float32."""

    width: int
    height: int
    gain: float  # e-/ADU
    read_noise_e: float
    full_well: float
    dark_e_per_s: float  # typical pixel at DARK_REFERENCE_TEMP
    osc: bool
    bayer: str
    seed: int
    bias_map: np.ndarray  # ADU
    dark_map: np.ndarray  # e-/s at DARK_REFERENCE_TEMP
    prnu: np.ndarray  # relative sensitivity, mean 1
    vignette: np.ndarray  # relative illumination from the optics
    hot_pixels: np.ndarray  # (n, 2) x, y of the hot pixels
    _flats: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def dark_rate(self, temperature: float) -> np.ndarray:
        """Thermal electrons per second per pixel at this sensor temperature."""
        factor = 2.0 ** ((temperature - DARK_REFERENCE_TEMP) / DARK_DOUBLING_C)
        return self.dark_map * np.float32(factor)

    def illumination(self, label: str) -> np.ndarray:
        """Flat field behind filter ``label``: optics x dust x PRNU.

        Normalised to a median of one over the central half of the frame (the box
        ``[h/4:3h/4, w/4:3w/4]``), the normalisation flat calibration uses, so a light
        divided by its normalised flat is back on the scale of the unvignetted sky. Dust on
        the sensor window is common to all filters; each filter adds a speck or two of its
        own, which is why flats must match the filter.
        """
        if label not in self._flats:
            field_ = self.vignette * self.prnu
            common = np.random.default_rng([self.seed, 41])
            field_ = field_ * _dust_shadows(common, self.shape, count=5)
            own = np.random.default_rng([self.seed, 42, zlib.crc32(label.encode())])
            field_ = field_ * _dust_shadows(own, self.shape, count=2)
            h, w = self.shape
            field_ /= np.float32(np.median(field_[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]))
            self._flats[label] = field_.astype(np.float32)
        return self._flats[label]

    def sites(self) -> np.ndarray:
        """(H, W) colour of each pixel, 0=R 1=G 2=B; pixel (0, 0) is the pattern's first letter."""
        return bayer_sites(self.shape, self.bayer)

    def expose(
        self,
        expected_e: np.ndarray | None,
        exptime: float,
        temperature: float,
        rng: np.random.Generator,
        extra_e: np.ndarray | None = None,
    ) -> np.ndarray:
        """Read out one frame: uint16 ADU from the expected photo-electrons on the sensor.

        ``expected_e`` must already include the illumination (flat field); ``extra_e`` is
        charge deposited without shot noise of its own statistics (cosmic-ray hits).
        """
        if exptime > 0 or expected_e is not None:
            mean = self.dark_rate(temperature) * np.float32(exptime)
            if expected_e is not None:
                mean += np.maximum(expected_e, np.float32(0.0))
            signal = shot_noise(rng, mean)
        else:  # a bias: no exposure, no charge
            signal = np.zeros(self.shape, dtype=np.float32)
        if extra_e is not None:
            signal += extra_e
        np.minimum(signal, np.float32(self.full_well), out=signal)
        signal *= np.float32(1.0 / self.gain)
        signal += self.bias_map
        noise = rng.standard_normal(self.shape, dtype=np.float32)
        noise *= np.float32(self.read_noise_e / self.gain)
        signal += noise
        np.rint(signal, out=signal)
        np.clip(signal, 0, 65535, out=signal)
        return signal.astype(np.uint16)


# Above this many expected electrons a rounded Gaussian is indistinguishable from a Poisson
# draw (skewness 1/sqrt(mean) < 0.15) and several times cheaper to make; below ``_TINY``
# (most pixels of a dark frame) inverting the Poisson CDF is exact and cheaper than numpy's
# general sampler, because after the first step only the few pixels with a count go on.
_GAUSSIAN_ABOVE = 50.0
_TINY_BELOW = 2.0


def shot_noise(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """Photon/thermal electron counts with the given means, as float32."""
    mean = np.asarray(mean, dtype=np.float32)
    flat = mean.reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    regime = (flat >= _TINY_BELOW).astype(np.int8) + (flat >= _GAUSSIAN_ABOVE)
    counts = np.bincount(regime, minlength=3)
    for which, draw in enumerate((_tiny_poisson, _poisson, _gaussian_counts)):
        if counts[which] == flat.size:
            out[:] = draw(rng, flat)
        elif counts[which]:
            sel = np.flatnonzero(regime == which)
            out[sel] = draw(rng, flat[sel])
    return out.reshape(mean.shape)


def _tiny_poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    u = rng.random(lam.size, dtype=np.float32)
    term = np.exp(-lam)
    cdf = term.copy()
    k = np.zeros(lam.size, dtype=np.float32)
    idx = np.flatnonzero(u > cdf)
    step = 1
    while idx.size:
        k[idx] += 1
        term_i = term[idx] * lam[idx] / np.float32(step)
        cdf_i = cdf[idx] + term_i
        term[idx], cdf[idx] = term_i, cdf_i
        idx = idx[u[idx] > cdf_i]
        step += 1
    return k


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    return rng.poisson(lam.astype(np.float64)).astype(np.float32)


def _gaussian_counts(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    z = rng.standard_normal(lam.size, dtype=np.float32)
    z *= np.sqrt(lam)
    z += lam
    return np.rint(z, out=z)


def bayer_sites(shape: tuple[int, int], pattern: str) -> np.ndarray:
    """Tile a 2x2 pattern such as ``RGGB`` (row 0: R G, row 1: G B) over the frame."""
    pattern = pattern.upper()
    if pattern not in ("RGGB", "BGGR", "GRBG", "GBRG"):
        raise ValueError(f"not a Bayer pattern: {pattern!r}")
    code = {"R": 0, "G": 1, "B": 2}
    cell = np.array([[code[pattern[0]], code[pattern[1]]], [code[pattern[2]], code[pattern[3]]]])
    h, w = shape
    return np.tile(cell, ((h + 1) // 2, (w + 1) // 2))[:h, :w].astype(np.int8)


def mosaic(planes: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """Sample (3, H, W) colour planes through the colour filter array."""
    return np.take_along_axis(planes, sites[None].astype(np.intp), axis=0)[0]


def make_camera(
    seed: int,
    width: int,
    height: int,
    *,
    gain: float,
    read_noise_e: float,
    bias_adu: float,
    full_well: float,
    dark_e_per_s: float,
    osc: bool,
    bayer: str,
    vignette_corner: float = 0.70,
) -> Camera:
    """Build the fixed patterns of one camera; the same seed always gives the same camera."""
    rng = np.random.default_rng([seed, 40])
    h, w = height, width
    columns = rng.normal(0.0, 1.5, w).astype(np.float32)
    rows = rng.normal(0.0, 0.6, h).astype(np.float32)
    ramp = np.linspace(0.0, 2.0, h, dtype=np.float32)  # amplifier side a little higher
    bias = bias_adu + columns[None, :] + (rows + ramp)[:, None]
    bias = bias + rng.normal(0.0, 0.5, (h, w)).astype(np.float32)

    # Dark current: log-normal spread around the typical value, hot and warm pixels on top.
    dark = (dark_e_per_s * rng.lognormal(0.0, 0.35, (h, w))).astype(np.float32)
    n_hot = max(8, round(4e-4 * w * h))
    n_warm = 3 * n_hot
    flat_index = rng.choice(w * h, n_hot + n_warm, replace=False)
    hot, warm = flat_index[:n_hot], flat_index[n_hot:]
    dark.reshape(-1)[hot] = np.exp(rng.uniform(math.log(1.0), math.log(30.0), n_hot))
    dark.reshape(-1)[warm] = np.exp(rng.uniform(math.log(0.02), math.log(0.3), n_warm))
    hot_xy = np.stack([hot % w, hot // w], axis=1)

    prnu = rng.normal(1.0, 0.004, (h, w)).astype(np.float32)

    # Vignetting of the cos^4 kind, (1 + (r/r0)^2)^-2, about an axis slightly off centre.
    ax = (w - 1) / 2.0 + rng.uniform(-0.03, 0.03) * w
    ay = (h - 1) / 2.0 + rng.uniform(-0.03, 0.03) * h
    corner = math.hypot(w / 2.0, h / 2.0)
    r0 = corner / math.sqrt(vignette_corner**-0.5 - 1.0)
    xs = (np.arange(w, dtype=np.float32) - ax) ** 2
    ys = (np.arange(h, dtype=np.float32) - ay) ** 2
    vignette = (1.0 + (xs[None, :] + ys[:, None]) / r0**2) ** -2

    return Camera(
        width=w,
        height=h,
        gain=gain,
        read_noise_e=read_noise_e,
        full_well=full_well,
        dark_e_per_s=dark_e_per_s,
        osc=osc,
        bayer=bayer.upper(),
        seed=seed,
        bias_map=bias.astype(np.float32),
        dark_map=dark,
        prnu=prnu,
        vignette=vignette.astype(np.float32),
        hot_pixels=hot_xy,
    )


def _dust_shadows(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """Transmission map of out-of-focus dust: soft dark rings with a lighter middle.

    Dust on a window in a converging beam casts the telescope's own pupil, central
    obstruction included, hence a donut rather than a spot.
    """
    h, w = shape
    out = np.ones(shape, dtype=np.float32)
    scale = min(w, h) / 768.0
    for _ in range(count):
        radius = rng.uniform(8.0, 28.0) * scale
        depth = rng.uniform(0.03, 0.12)
        cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
        reach = math.ceil(radius + 4)
        x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
        y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        r = np.hypot(xx - cx, yy - cy)
        soft = 1.0 + 0.05 * radius
        disc = 0.5 * (1.0 - np.tanh((r - radius) / soft))
        hole = 0.5 * (1.0 - np.tanh((r - 0.45 * radius) / soft))
        out[y0:y1, x0:x1] *= (1.0 - depth * (disc - 0.7 * hole)).astype(np.float32)
    return out
