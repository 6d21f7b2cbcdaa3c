"""The sky above the telescope: stars, a nebula and the glow of the night sky.

Everything fixed to the sky lives in *reference coordinates*: the pixel grid of the first
light. A frame sees it through its own affine transform, so stars are placed by mapping their
reference positions into the frame and the nebula, kept as an image over a disc larger than
any dithered or flipped frame, is resampled with that same transform. Nothing is ever
re-rendered in another grid and mapped back, which is what makes the recorded transforms exact.

Stars are Moffat profiles, the shape seeing actually gives (a Gaussian core with wings that a
Gaussian lacks), added as small stamps sized from each star's brightness, so a faint star costs
a few hundred pixels and a saturated one a few thousand. The nebula is log-normal fractal
noise under soft envelopes: that is what makes it look like gas at every scale, not like a
blob. The sky glow is a tilted, slightly curved plane fixed to the horizon, not to the sky.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from subwatch.simulate import bands

# Stamp half-sizes tried from the smallest up; grouping stars by stamp size keeps the
# rendering a handful of array operations instead of one per star.
_STAMP_RADII = (4, 5, 6, 7, 8, 10, 12, 15, 18, 24, 32, 44, 60)


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Core width of a Moffat profile with the given FWHM."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_peak(flux: np.ndarray | float, fwhm: float, beta: float) -> np.ndarray | float:
    """Central surface brightness (per pixel) of a Moffat star of total ``flux``."""
    alpha = moffat_alpha(fwhm, beta)
    return flux * (beta - 1.0) / (math.pi * alpha * alpha)


def render_stars(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    beta: float,
    floor: float = 0.25,
) -> np.ndarray:
    """Sum of Moffat stars sampled at pixel centres; ``flux`` is (N,) or (planes, N).

    Returns float32 (H, W) or (planes, H, W). The profile is computed once per star and
    shared by all planes (colour changes the flux, not the seeing). A stamp reaches out to
    where the profile falls below ``floor`` (in flux units per pixel) and at least two
    FWHM, so what is cut from the wings stays far below the noise.
    """
    h, w = shape
    fluxes = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    planes = fluxes.shape[0]
    if fwhm > 2.0 * _COARSE_FWHM:
        result = _render_coarse(shape, x, y, fluxes, fwhm, beta, floor)
        return result[0] if np.ndim(flux) == 1 else result
    out = np.zeros((planes, h * w), dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size:
        alpha2 = moffat_alpha(fwhm, beta) ** 2
        norm = (beta - 1.0) / (math.pi * alpha2)
        peak = np.abs(fluxes).max(axis=0) * norm
        with np.errstate(divide="ignore"):
            reach = np.sqrt(alpha2 * np.clip((peak / floor) ** (1.0 / beta) - 1.0, 0.0, None))
        need = np.maximum(reach, 2.0 * fwhm)
        radii = np.asarray(_STAMP_RADII)
        bucket = radii[np.minimum(np.searchsorted(radii, need), radii.size - 1)]
        inside = (x > -bucket) & (x < w - 1 + bucket) & (y > -bucket) & (y < h - 1 + bucket)
        for radius in np.unique(bucket[inside]):
            sel = np.flatnonzero(inside & (bucket == radius))
            _splat(out, (h, w), x[sel], y[sel], fluxes[:, sel], int(radius), alpha2, beta, norm)
    result = out.reshape(planes, h, w).astype(np.float32)
    return result[0] if np.ndim(flux) == 1 else result


# Stars wider than twice this are drawn on a grid coarser by an integer factor, where they
# are about this wide, and enlarged: a defocused frame then costs what a sharp one does.
_COARSE_FWHM = 3.0


def _render_coarse(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    fluxes: np.ndarray,
    fwhm: float,
    beta: float,
    floor: float,
) -> np.ndarray:
    """Render on a grid ``f`` times coarser and enlarge it (bicubic, good to ~2 % of a peak).

    ``cv2.resize`` samples coarse coordinate ``(x + 0.5) / f - 0.5`` for fine pixel ``x``;
    placing each star at that coarse coordinate keeps its centre exactly where it was, and
    the profile, ``f`` times narrower on the coarse grid, is smooth enough there (FWHM >=
    3 px) for interpolation. Dividing by ``f**2`` restores flux per fine pixel.
    """
    h, w = shape
    f = int(fwhm // _COARSE_FWHM)
    hc, wc = -(-h // f) + 1, -(-w // f) + 1
    xc = (np.asarray(x, dtype=np.float64) + 0.5) / f - 0.5
    yc = (np.asarray(y, dtype=np.float64) + 0.5) / f - 0.5
    coarse = render_stars((hc, wc), xc, yc, fluxes, fwhm / f, beta, floor * f * f)
    out = np.empty((fluxes.shape[0], h, w), dtype=np.float32)
    for p in range(fluxes.shape[0]):
        big = cv2.resize(coarse[p], (wc * f, hc * f), interpolation=cv2.INTER_CUBIC)
        out[p] = np.maximum(big[:h, :w], 0.0) / np.float32(f * f)
    return out


def _splat(
    out: np.ndarray,
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    fluxes: np.ndarray,
    radius: int,
    alpha2: float,
    beta: float,
    norm: float,
) -> None:
    """Add one group of same-sized stamps to the flattened planes in ``out``."""
    h, w = shape
    offsets = np.arange(-radius, radius + 1)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    px = ix[:, None, None] + offsets[None, None, :]
    py = iy[:, None, None] + offsets[None, :, None]
    d2 = ((px - x[:, None, None]) ** 2 + (py - y[:, None, None]) ** 2).astype(np.float32)
    profile = np.float32(norm) * (1.0 + d2 * np.float32(1.0 / alpha2)) ** np.float32(-beta)
    valid = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    index = (py * w + px)[valid]
    for plane in range(fluxes.shape[0]):
        weights = (profile * fluxes[plane][:, None, None])[valid]
        out[plane] += np.bincount(index, weights=weights, minlength=h * w)


@dataclass
class StarField:
    """Stars in reference coordinates; ``rate`` is e-/s through the L filter, above the air."""

    x: np.ndarray
    y: np.ndarray
    rate: np.ndarray
    spectrum: np.ndarray  # (N, 6)

    def rates_in(self, response: np.ndarray) -> np.ndarray:
        """e-/s of every star through a filter or Bayer site with this response."""
        return self.rate * (self.spectrum @ response)


def make_starfield(
    rng: np.random.Generator,
    bounds: tuple[float, float, float, float],
    density_per_mpx: float,
    min_rate: float,
    max_rate: float,
    slope: float = 0.7,
) -> StarField:
    """Uniform positions over ``bounds`` = (x0, y0, x1, y1); a power-law flux function.

    N(>F) ~ F**-slope: a slope near 0.7 is what star counts at moderate galactic latitude
    give over the few magnitudes a sub reaches, many faint stars and a few bright ones.
    """
    x0, y0, x1, y1 = bounds
    n = max(1, round(density_per_mpx * (x1 - x0) * (y1 - y0) / 1e6))
    x = rng.uniform(x0, x1, n)
    y = rng.uniform(y0, y1, n)
    rate = np.minimum(min_rate * rng.uniform(0.0, 1.0, n) ** (-1.0 / slope), max_rate)
    return StarField(x, y, rate, bands.star_colours(rng, n))


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], scales: tuple[float, ...], slope: float = 1.0
) -> np.ndarray:
    """Zero-mean, unit-variance isotropic noise with structure at each of ``scales`` (px).

    Each octave is white noise blurred on a coarse grid (four cells per blur sigma) and
    enlarged, so an octave of scale 128 costs as little as one of scale 4. Octaves are
    weighted by ``scale**slope``: large scales dominate, small ones add texture.
    """
    h, w = shape
    acc = np.zeros((h, w), dtype=np.float32)
    for scale in scales:
        step = max(scale / 4.0, 1.0)
        ch, cw = math.ceil(h / step) + 3, math.ceil(w / step) + 3
        coarse = rng.standard_normal((ch, cw)).astype(np.float32)
        coarse = cv2.GaussianBlur(coarse, (0, 0), sigmaX=scale / step)
        coarse /= max(float(coarse.std()), 1e-12)
        if step == 1.0:
            fine = coarse
        else:
            size = (math.ceil(cw * step), math.ceil(ch * step))
            fine = cv2.resize(coarse, size, interpolation=cv2.INTER_LINEAR)
        oy = int(rng.integers(0, max(1, fine.shape[0] - h)))
        ox = int(rng.integers(0, max(1, fine.shape[1] - w)))
        acc += np.float32(scale**slope) * fine[oy : oy + h, ox : ox + w]
    acc -= acc.mean()
    acc /= max(float(acc.std()), 1e-12)
    return acc


@dataclass
class Nebula:
    """Emission in reference coordinates: (h, w, 3) e-/s per pixel in Ha, [O III], [S II].

    ``origin`` is the reference coordinate of the canvas pixel (0, 0); the values are the
    L-filter rates of each line, so a filter's image is the canvas dotted with its line
    responses.
    """

    canvas: np.ndarray
    origin: tuple[float, float]

    def render(self, frame_to_ref: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) line rates seen by a frame whose pixels map to reference by the matrix."""
        matrix = np.array(frame_to_ref, dtype=np.float64).copy()
        matrix[0, 2] -= self.origin[0]
        matrix[1, 2] -= self.origin[1]
        h, w = shape
        return cv2.warpAffine(
            self.canvas,
            matrix,
            (w, h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )


def make_nebula(
    rng: np.random.Generator,
    bounds: tuple[float, float, float, float],
    frame_size: tuple[int, int],
    peak_rate: float,
) -> Nebula:
    """An emission nebula of M42's temperament: red hydrogen, a teal core, dark lanes.

    H-alpha is log-normal fractal noise under a broad envelope plus thin filaments (the
    ridges where a second noise field crosses zero); [O III] is smoother and more compact;
    [S II] follows H-alpha patchily. Dust lanes dim all three. The whole is scaled so that
    its brightest smoothed point is ``peak_rate`` in L. The canvas covers ``bounds`` (in
    reference pixels), which must contain every frame's footprint.
    """
    x0, y0, x1, y1 = bounds
    origin = (math.floor(x0), math.floor(y0))
    shape = (math.ceil(y1) - origin[1] + 1, math.ceil(x1) - origin[0] + 1)
    w, h = frame_size
    small = min(w, h)
    cx = (w - 1) / 2.0 + rng.uniform(-0.06, 0.06) * w - origin[0]
    cy = (h - 1) / 2.0 + rng.uniform(-0.06, 0.06) * h - origin[1]
    xs = np.arange(shape[1], dtype=np.float32)[None, :] - np.float32(cx)
    ys = np.arange(shape[0], dtype=np.float32)[:, None] - np.float32(cy)
    theta = rng.uniform(0, math.pi)
    cos_t, sin_t = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    u = xs * cos_t + ys * sin_t
    v = ys * cos_t - xs * sin_t

    def envelope(sigma: float, ratio: float) -> np.ndarray:
        return np.exp(
            np.float32(-0.5) * ((u / np.float32(sigma)) ** 2 + (v / np.float32(sigma * ratio)) ** 2)
        )

    big = tuple(s * small / 768 for s in (24, 48, 96, 192, 384))
    fine = tuple(s * small / 768 for s in (3, 6, 12, 24, 48))
    clumps = fractal_noise(rng, shape, big)
    texture = fractal_noise(rng, shape, fine, slope=0.6)
    ridges = fractal_noise(rng, shape, tuple(s * small / 768 for s in (12, 24, 48, 96)))
    lanes = fractal_noise(rng, shape, tuple(s * small / 768 for s in (16, 32, 64, 128)))
    patches = fractal_noise(rng, shape, big)

    wide = envelope(0.30 * small, 0.75)
    ha = wide * np.exp(0.8 * clumps + 0.35 * texture)
    ha += 2.0 * envelope(0.08 * small, 0.8) * np.exp(0.4 * texture)
    # Filaments: thin where the ridge field is steep, brighter where a broad field is high.
    filaments = np.exp(-((ridges / 0.1) ** 2) + 0.3 * texture + 0.9 * patches)
    ha += 0.6 * envelope(0.42 * small, 0.7) * filaments
    oiii = 1.6 * envelope(0.11 * small, 0.9) * np.exp(0.5 * clumps + 0.25 * texture)
    sii = 0.25 * ha * np.exp(0.4 * patches)
    dust = 1.0 - 0.75 / (1.0 + np.exp(-(lanes - 1.0) * 4.0))
    canvas = np.stack([ha * dust, oiii * dust, sii * dust], axis=-1).astype(np.float32)
    total = cv2.GaussianBlur(canvas.sum(axis=-1), (0, 0), 2.0)
    canvas *= np.float32(peak_rate / max(float(total.max()), 1e-12))
    return Nebula(canvas, origin)


def sky_glow(
    shape: tuple[int, int],
    level: float,
    angle_rad: float,
    tilt: float,
    curvature: float,
) -> np.ndarray:
    """Background in e- per pixel: ``level`` at the centre, a plane rising by ``tilt``
    (a fraction of the level, edge to centre) towards ``angle_rad``, and a bowl of
    ``curvature`` at the corners (scattered light grows away from the optical axis)."""
    h, w = shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    half = max(w, h) / 2.0
    xs = (np.arange(w, dtype=np.float32) - cx) / half
    ys = (np.arange(h, dtype=np.float32) - cy) / half
    plane = math.cos(angle_rad) * xs[None, :] + math.sin(angle_rad) * ys[:, None]
    bowl = xs[None, :] ** 2 + ys[:, None] ** 2
    return (level * (1.0 + tilt * plane + curvature * bowl)).astype(np.float32)


def trail_image(
    shape: tuple[int, int], p0: tuple[float, float], p1: tuple[float, float], width: float
) -> np.ndarray:
    """A straight line of unit peak with a Gaussian cross-section of FWHM ``width``."""
    h, w = shape
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length = math.hypot(dx, dy)
    nx, ny = -dy / length, dx / length
    xs = np.arange(w, dtype=np.float32) - p0[0]
    ys = np.arange(h, dtype=np.float32) - p0[1]
    dist = xs[None, :] * nx + ys[:, None] * ny
    return np.exp(-4.0 * math.log(2.0) * (dist / width) ** 2).astype(np.float32)


def line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Normalised, point-symmetric kernel of a star dragged ``length`` px at ``angle_deg``.

    Centred on the middle of the drag, so the smeared star keeps its centroid and the
    frame's recorded transform still holds for it.
    """
    half = math.ceil(length / 2.0) + 2
    size = 2 * half + 1
    kernel = np.zeros((size, size), dtype=np.float64)
    ts = np.linspace(-length / 2.0, length / 2.0, int(length * 8) + 1)
    xs = half + ts * math.cos(math.radians(angle_deg))
    ys = half + ts * math.sin(math.radians(angle_deg))
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for ddx, ddy, wgt in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(kernel, (y0 + ddy, x0 + ddx), wgt)
    kernel = 0.5 * (kernel + kernel[::-1, ::-1])
    return (kernel / kernel.sum()).astype(np.float32)
