"""Star detection and shape measurement, fast enough for every sub of a 26 MP camera.

Detection works on a binned copy (2x2 blocks averaged for stars of about 3 px FWHM, 4x4 for
wide ones), so every full-frame pass after the binning touches a quarter of the pixels or
less. Binning loses little: a 3 px FWHM star still spans several binned pixels, and the
matched filter keeps about 90 % of the signal-to-noise ratio it has at full resolution.

1. *Matched filter*: the binned image is smoothed with a Gaussian of a star's binned size. It
   lifts stars above the noise and spreads a single hot pixel or cosmic ray thin.
2. *Local sky*: a 3x3 median on a coarser grid (cells of about one FWHM, so spanning 3-5
   FWHM) is subtracted. Unlike the mesh it follows the edges of a nebula, its filaments and
   the wings of bright stars, so a faint star in a dark lane beside bright gas is still a
   peak; a star barely lifts a median that wide.
3. *Threshold*: local maxima (3x3) more than ``threshold`` times the noise of this detection
   image. That noise is the per-pixel noise mesh times a fixed factor: what the same binning,
   filter and median make of unit white noise (computed once by running them on it), raised
   where the binned image is noisier than independent pixels would make it (neighbouring
   pixels of an interpolated colour frame share their noise). Nebular structure is
   deliberately not counted as noise: it would hide the stars in front of it.
4. *Hot pixels and cosmic rays*: at full resolution, a candidate's brightest pixel stands
   alone: even an undersampled star (FWHM 1.5 px) lights two of its four neighbours to a
   third of its peak, a hot pixel none and a two- or three-pixel cosmic-ray track one. Those
   are dropped. What is left is the detection count, which the clouds gate compares between
   subs; it includes the knots of a nebula that are as compact as stars.

Measurement takes only the ``max_stars`` strongest candidates (plenty for shape statistics,
SNR and registration) and cuts full-resolution stamps around them. Moments and photometry
subtract the local sky of step 2; the profile fit subtracts a plane through the medians of
the stamp's four sides and fits a constant on top.

* *Adaptive moments* (Bernstein & Jarvis 2002): an elliptical-star-agnostic Gaussian window is
  re-centred on the star and resized until its size matches the star's own second moments.
  The weighted first moments give a centroid good to a few hundredths of a pixel, the
  window-corrected second moments give the eccentricity, and the window's sigma is a Gaussian
  equivalent size that tells stars from nebular knots (wider) and hot pixels (sharper). Knots
  that pass are elongated where stars are round, and clear outliers in elongation go too
  (unless every star is elongated: a trailed frame must still be measured as one).
* *A Moffat fit* for the width: seeing gives stars a Gaussian-like core with wings that a
  Gaussian lacks, which makes moment-based widths read 10 % wide. The brightest isolated,
  unsaturated stars are fitted with ``A (1 + (2^(1/beta) - 1) 4 r^2 / FWHM^2)^-beta + B``
  (centre, peak, FWHM, beta and local sky free), all stars at once by damped Gauss-Newton
  iterations on the stack of stamps. Writing the profile in FWHM rather than the core radius
  keeps FWHM nearly independent of the poorly known beta. The half-flux radius (HFR) follows
  from the same profile: ``alpha sqrt(2^(1/(beta-1)) - 1)``. Stars not fitted get the frame's
  fitted-to-moment width ratio applied to their moment width.

The star list keeps candidates whose aperture SNR (radius 2 FWHM) clears ``threshold`` and
saturated stars, whose moments may have failed but whose position registration still wants.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

from subwatch.measure.background import Background, Pyramid, difference_noise, scratch

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: Stars measured on full-resolution stamps; the rest are only counted.
MAX_STARS = 300
#: Stars given a Moffat fit for FWHM, beta and HFR (the brightest good ones).
MAX_FIT = 60
#: ``StarList.xyf`` keeps stars of at least this aperture SNR when there are this many.
REGISTRATION_SNR = 20.0
REGISTRATION_STARS = 15
#: Centroid uncertainty left at high SNR (px), added in quadrature to FWHM / SNR: see ``xyfs``.
CENTROID_FLOOR_PX = 0.01


@dataclass
class StarList:
    """Measured stars, brightest first. Coordinates are 0-based pixels, x = column."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray  # ADU in the aperture (radius 2 FWHM), background subtracted
    peak: np.ndarray  # ADU above background
    sigma: np.ndarray  # Gaussian-equivalent sigma from adaptive moments, px
    eccentricity: np.ndarray
    saturated: np.ndarray  # bool
    snr: np.ndarray  # background-limited aperture SNR
    # Optional for callers that build a list by hand: the defaults describe Gaussian stars.
    fwhm: np.ndarray | None = None  # px: Moffat fit, or moment width x the frame's fit ratio
    hfr: np.ndarray | None = None  # half-flux radius, px, same provenance as ``fwhm``
    beta: np.ndarray | None = None  # Moffat beta of fitted stars, NaN for the others
    fitted: np.ndarray | None = None  # bool: fwhm, hfr, beta from this star's own profile fit

    def __post_init__(self) -> None:
        if self.fwhm is None:
            self.fwhm = np.asarray(self.sigma, np.float64) * FWHM_PER_SIGMA
        if self.hfr is None:
            self.hfr = 0.5 * np.asarray(self.fwhm, np.float64)  # a Gaussian's HFR is FWHM / 2
        if self.beta is None:
            self.beta = np.full(np.shape(self.x), np.nan)
        if self.fitted is None:
            self.fitted = np.zeros(np.shape(self.x), bool)

    def __len__(self) -> int:
        return int(self.x.size)

    def xyf(self, min_snr: float | None = None) -> np.ndarray:
        """(N, 3) array of x, y, flux, brightest first: the form registration takes.

        By default the faint stars are left out when there are plenty of bright ones: a star
        at SNR 10 has a centroid ten times worse than one at SNR 100, and a least-squares fit
        that weighs all stars alike is better off without it. ``min_snr`` sets the cut (0:
        every star); saturated stars are always kept.
        """
        keep = self._registration_stars(min_snr)
        return np.column_stack([self.x[keep], self.y[keep], self.flux[keep]])

    def xyfs(self, min_snr: float | None = None) -> np.ndarray:
        """(N, 4) array of x, y, flux and positional uncertainty (px), the same stars as
        ``xyf``: registration weighs each star pair by its inverse variance.

        The uncertainty is ``FWHM / SNR`` with ``CENTROID_FLOOR_PX`` added in quadrature (what
        sampling and the centroid method leave even at high SNR); saturated stars get an
        infinite one: their flat cores centre poorly, so they help to match but weigh nothing
        in the fit. Side by side on simulated nights (benchmarks/RESULTS.md) this took the
        transform error at 1024x768 from 0.0067 / 0.0108 px (median / max, equal weights) to
        0.0031 / 0.0046 px, and at 3008x3008 from 0.0025 / 0.0035 to 0.0018 / 0.0021 px.
        """
        keep = self._registration_stars(min_snr)
        fwhm = np.asarray(self.fwhm, np.float64)[keep]
        typical = np.nanmedian(fwhm) if np.isfinite(fwhm).any() else 3.0
        fwhm = np.where(np.isfinite(fwhm) & (fwhm > 0), fwhm, typical)
        snr = np.maximum(np.asarray(self.snr, np.float64)[keep], 1e-3)
        sigma = np.hypot(fwhm / snr, CENTROID_FLOOR_PX)
        sigma[self.saturated[keep]] = np.inf
        return np.column_stack([self.x[keep], self.y[keep], self.flux[keep], sigma])

    def _registration_stars(self, min_snr: float | None) -> np.ndarray:
        if min_snr is None:
            bright = (self.snr >= REGISTRATION_SNR) | self.saturated
            return bright if bright.sum() >= REGISTRATION_STARS else np.ones(len(self), bool)
        return (self.snr >= min_snr) | self.saturated

    def good(self) -> np.ndarray:
        """Stars fit for shape statistics: unsaturated and clearly detected."""
        return (~self.saturated) & (self.snr >= 10)

    def select(self, keep: np.ndarray) -> StarList:
        return StarList(*(getattr(self, f)[keep] for f in StarList.__dataclass_fields__))

    @classmethod
    def empty(cls) -> StarList:
        z = np.zeros(0)
        b = np.zeros(0, bool)
        return cls(z, z, z, z, z, z, b, z, z, z, z, b)


@dataclass
class Detections:
    """What ``detect_stars`` found: every detection, and the brightest ones measured."""

    stars: StarList
    xy: np.ndarray  # (count, 2) x, y of every detection: the measured stars, then the rest
    binning: int  # block size of the detection image

    @property
    def count(self) -> int:
        """Detections above threshold, hot pixels and cosmic rays excluded."""
        return int(self.xy.shape[0])


def _gather(
    image: np.ndarray, xs: np.ndarray, ys: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2r+1, 2r+1) float32 stamps centred on integer pixels, and which pixels are inside.

    Pixels outside the image read as its nearest edge pixel and are marked outside.
    """
    h, w = image.shape
    n, size = xs.size, 2 * r + 1
    offs = np.arange(-r, r + 1)
    edge = (xs < r) | (xs >= w - r) | (ys < r) | (ys >= h - r)
    if image.flags.c_contiguous and not edge.all():
        # Stamps wholly inside: one flat index per pixel; the few at the edges apart.
        index = (ys * w + xs)[:, None, None] + (offs[:, None] * w + offs[None, :])[None]
        if edge.any():
            index[edge] = 0
        stamps = np.take(image.reshape(-1), index).astype(np.float32, copy=False)
        inside = np.ones((n, size, size), bool)
        if edge.any():
            sub, sub_inside = _gather_clipped(image, xs[edge], ys[edge], r)
            stamps[edge] = sub
            inside[edge] = sub_inside
        return stamps, inside
    return _gather_clipped(image, xs, ys, r)


def _gather_clipped(
    image: np.ndarray, xs: np.ndarray, ys: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape
    offs = np.arange(-r, r + 1)
    rows = ys[:, None] + offs[None, :]
    cols = xs[:, None] + offs[None, :]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows = np.clip(rows, 0, h - 1)[:, :, None]
    cols = np.clip(cols, 0, w - 1)[:, None, :]
    return image[rows, cols].astype(np.float32, copy=False), inside


def _bilinear(grid: np.ndarray, factor: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of a grid binned by ``factor`` at full-resolution points (any shape)."""
    gh, gw = grid.shape
    u = np.clip((x - (factor - 1) / 2.0) / factor, 0.0, gw - 1.0)
    v = np.clip((y - (factor - 1) / 2.0) / factor, 0.0, gh - 1.0)
    j0 = np.minimum(u.astype(np.int64), max(gw - 2, 0))
    i0 = np.minimum(v.astype(np.int64), max(gh - 2, 0))
    fu = (u - j0).astype(np.float32)
    fv = (v - i0).astype(np.float32)
    flat = np.ascontiguousarray(grid, dtype=np.float32).reshape(-1)
    k = i0 * gw + j0
    dj = 1 if gw > 1 else 0
    di = gw if gh > 1 else 0
    top = np.take(flat, k) * (1 - fu) + np.take(flat, k + dj) * fu
    bottom = np.take(flat, k + di) * (1 - fu) + np.take(flat, k + di + dj) * fu
    return top * (1 - fv) + bottom * fv


def detection_binning(fwhm_guess: float, shape: tuple[int, int]) -> int:
    """Block size for detection: a star should still be 1.5 binned pixels or more across."""
    f = 1
    while f < 4 and fwhm_guess / (2 * f) >= 1.4 and min(shape) // (2 * f) >= 64:
        f *= 2
    return f


def local_sky_binning(fwhm_guess: float, f: int, shape: tuple[int, int]) -> int:
    """Block size of the grid the local sky is a 3x3 median on: about 1 FWHM or more, >= 2 f.

    The median then spans 3 to 5 FWHM: wide enough that a star barely lifts it, narrow
    enough to follow a nebula's edges.
    """
    fb = 2 * f
    while fb < 0.8 * fwhm_guess and min(shape) // (2 * fb) >= 8:
        fb *= 2
    return fb


def _upsample(
    img: np.ndarray, factor: int, shape: tuple[int, int], dst: np.ndarray | None = None
) -> np.ndarray:
    """Bilinear enlargement by ``factor`` onto a grid of ``shape`` whose pixel centres line up.

    Coarse pixel ``i`` is centred on fine pixel ``factor * i + (factor - 1) / 2``, which is
    what ``cv2.resize`` assumes; a fine grid larger than ``factor`` times the coarse one (a
    ragged edge binned away) repeats its last row and column.
    """
    h, w = img.shape
    hh, ww = shape
    if (h * factor, w * factor) == (hh, ww):
        return cv2.resize(img, (ww, hh), dst=dst, interpolation=cv2.INTER_LINEAR)
    big = cv2.resize(img, (w * factor, h * factor), interpolation=cv2.INTER_LINEAR)
    return cv2.copyMakeBorder(
        big[:hh, :ww],
        0,
        max(0, hh - big.shape[0]),
        0,
        max(0, ww - big.shape[1]),
        cv2.BORDER_REPLICATE,
        dst=dst,
    )


@functools.lru_cache(maxsize=16)
def _white_ratio(f: int, fb: int, sk: float) -> float:
    """Standard deviation of the detection image of unit white noise (binning ``f``, matched
    filter ``sk`` binned px, local sky on blocks of ``fb``), measured once by running it."""
    size = 64 * fb
    noise = np.random.default_rng(12345).standard_normal((size, size)).astype(np.float32)
    pyr = Pyramid(noise)
    k1 = cv2.getGaussianKernel(2 * math.ceil(3.0 * sk) + 1, sk, cv2.CV_32F)
    resid = cv2.sepFilter2D(pyr.level(f), cv2.CV_32F, k1, k1, borderType=cv2.BORDER_REFLECT)
    resid -= _upsample(cv2.medianBlur(pyr.level(fb), 3), fb // f, resid.shape)
    m = 8 // f + 4  # away from the borders
    return float(np.std(resid[m:-m, m:-m], dtype=np.float64))


def detect_stars(
    image: np.ndarray,
    background: Background,
    *,
    pyramid: Pyramid | None = None,
    saturation: float | None = None,
    threshold: float = 5.0,
    fwhm_guess: float = 3.0,
    max_stars: int = MAX_STARS,
    max_fit: int = MAX_FIT,
) -> Detections:
    """Detect, count and measure the stars of a 2D image (ADU, background not subtracted).

    ``saturation`` is the level (ADU) at which star cores clipped: such stars are kept for
    registration, flagged, and left out of shape and photometry statistics.
    """
    if image.ndim != 2:
        raise ValueError("detect_stars expects a 2D image")
    pyr = pyramid if pyramid is not None else Pyramid(image)
    h, w = image.shape
    noise = background.noise
    if not np.isfinite(noise) or noise <= 0:
        return Detections(StarList.empty(), np.zeros((0, 2)), 1)
    f = detection_binning(fwhm_guess, (h, w))
    binned = pyr.level(f)
    hb, wb = binned.shape

    # Matched filter at the star's binned size.
    sigma_star = fwhm_guess / FWHM_PER_SIGMA
    sk = max(0.6, math.sqrt(sigma_star**2 + (f * f - 1) / 12.0) / f)
    k1 = cv2.getGaussianKernel(2 * math.ceil(3.0 * sk) + 1, sk, cv2.CV_32F)
    resid = cv2.sepFilter2D(
        binned,
        cv2.CV_32F,
        k1,
        k1,
        dst=scratch("detect", (hb, wb)) if pyr.reuse else None,
        borderType=cv2.BORDER_REFLECT,
    )
    # Local sky: a 3x3 median on a grid of cells about 1 FWHM or more across, which follows
    # nebulosity and the wings of bright stars far closer than the mesh can.
    fb = local_sky_binning(fwhm_guess, f, (h, w))
    coarse_sky = cv2.medianBlur(pyr.level(fb), 3)
    buffer = _upsample(
        coarse_sky, fb // f, (hb, wb), scratch("detect_sky", (hb, wb)) if pyr.reuse else None
    )
    cv2.subtract(resid, buffer, dst=resid)
    # Noise of this detection image per unit of per-pixel noise: exact for independent pixels
    # (the same filters run on white noise), times how much noisier the binned image is than
    # independent pixels would make it (colour interpolation correlates neighbours). Sky
    # structure is left out on purpose: a nebula must not hide the stars in front of it.
    ratio = _white_ratio(f, fb, round(sk, 3))
    if f > 1:
        binned_noise = difference_noise(binned)
        if np.isfinite(binned_noise) and binned_noise > 0:
            ratio *= max(1.0, binned_noise * f / noise)
    mesh = background.noise_mesh if background.noise_mesh is not None else None
    quietest = float(np.min(mesh)) if mesh is not None else noise
    floor = threshold * ratio * quietest
    # A local maximum above the floor: at least its 3x3 maximum and the floor, in one compare.
    cv2.dilate(resid, np.ones((3, 3), np.uint8), dst=buffer)
    cv2.max(buffer, float(np.nextafter(np.float32(floor), np.float32(np.inf))), dst=buffer)
    peaks = scratch("detect_peaks", (hb, wb), np.uint8) if pyr.reuse else None
    peaks = cv2.compare(resid, buffer, cv2.CMP_GE, dst=peaks)
    flat = _nonzero(peaks)
    del buffer, peaks
    if flat.size == 0:
        return Detections(StarList.empty(), np.zeros((0, 2)), f)
    by, bx = np.divmod(flat, wb)

    # Sub-pixel peak of the smoothed image (a parabola through 3 points on each axis).
    def val(dy: int, dx: int) -> np.ndarray:
        return resid[np.clip(by + dy, 0, hb - 1), np.clip(bx + dx, 0, wb - 1)]

    s0 = val(0, 0)
    ddx = _parabola(val(0, -1), s0, val(0, 1))
    ddy = _parabola(val(-1, 0), s0, val(1, 0))
    x = f * (bx + ddx) + (f - 1) / 2.0
    y = f * (by + ddy) + (f - 1) / 2.0
    sky = _bilinear(coarse_sky, fb, x, y).astype(np.float64)
    local_noise = background.at(x, y, (h, w), "noise")
    strength = s0 / (ratio * local_noise)
    significant = strength > threshold
    x, y, strength, sky, local_noise = (a[significant] for a in (x, y, strength, sky, local_noise))

    # A flat top (a saturated core) ties with its neighbours in the 3x3 maximum test: of
    # touching maxima keep the first in raster order.
    keep = _first_of_ties(bx[significant], by[significant], wb)
    x, y, strength, sky, local_noise = (a[keep] for a in (x, y, strength, sky, local_noise))
    order = np.argsort(-strength)
    x, y, strength, sky, local_noise = (a[order] for a in (x, y, strength, sky, local_noise))

    # Hot pixels and cosmic rays: a lone bright pixel among its four neighbours.
    keep = ~_lone_pixels(image, x, y, sky, local_noise)
    x, y, strength, sky, local_noise = (a[keep] for a in (x, y, strength, sky, local_noise))
    if x.size == 0:
        return Detections(StarList.empty(), np.zeros((0, 2)), f)

    n = min(x.size, max_stars)
    stars, detected = _measure(
        image,
        x[:n],
        y[:n],
        sky[:n],
        local_noise[:n],
        all_xy=np.column_stack([x, y]),
        coarse_sky=coarse_sky,
        sky_binning=fb,
        saturation=saturation,
        threshold=threshold,
        fwhm_guess=fwhm_guess,
        max_fit=max_fit,
    )
    return Detections(stars, np.vstack([detected, np.column_stack([x[n:], y[n:]])]), f)


def _nonzero(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the nonzero bytes of a sparse uint8 mask.

    The mask is read as 64-bit words, so the scan skips eight empty pixels at a time.
    """
    flat = mask.reshape(-1)
    pad = (-flat.size) % 8
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    words = flat.view(np.uint64)
    hits = np.flatnonzero(words)
    row, col = np.nonzero(words[hits].view(np.uint8).reshape(-1, 8))
    return hits[row] * 8 + col


def _parabola(left: np.ndarray, mid: np.ndarray, right: np.ndarray) -> np.ndarray:
    den = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (left - right) / den, 0.0)
    return np.clip(off, -0.5, 0.5)


def _first_of_ties(bx: np.ndarray, by: np.ndarray, width: int) -> np.ndarray:
    """False for a maximum whose left, upper-left, upper or upper-right neighbour is one too."""
    flat = by * width + bx
    srt = np.sort(flat)
    keep = np.ones(bx.size, bool)
    for step in (1, width - 1, width, width + 1):
        pos = np.minimum(np.searchsorted(srt, flat - step), srt.size - 1)
        keep &= srt[pos] != flat - step
    return keep


def _lone_pixels(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, sky: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """True where the brightest pixel near a candidate stands alone (hot pixel, cosmic ray).

    Looks at the brightest pixel of the 3x3 around the candidate and its four neighbours. A
    star of FWHM >= 1.5 px lights at least two of them to a third of its peak whatever its
    sub-pixel position; a hot pixel lights none and a cosmic-ray track of two or three pixels
    at most one. Only clear peaks (above 8 sigma) are judged: noise decides the rest.
    """
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    lone = np.zeros(x.size, bool)
    # Most candidates are faint: only those whose brightest core pixel is a clear peak need
    # their neighbours looked at.
    core, inside = _gather(image, ix, iy, 1)
    core = np.where(inside, core, -np.inf).reshape(-1, 9)
    clear = np.flatnonzero(core.max(axis=1) - sky > 8.0 * noise)
    if clear.size == 0:
        return lone
    k = np.argmax(core[clear], axis=1)
    px, py = ix[clear] + k % 3 - 1, iy[clear] + k // 3 - 1
    stamp, inside = _gather(image, px, py, 1)
    stamp = np.where(inside, stamp - sky[clear, None, None].astype(np.float32), 0.0)
    p = stamp[:, 1, 1]
    nb = np.stack([stamp[:, 0, 1], stamp[:, 2, 1], stamp[:, 1, 0], stamp[:, 1, 2]], axis=1)
    second = np.sort(nb, axis=1)[:, 2]  # the second brightest neighbour
    lone[clear] = second < 0.15 * p
    return lone


def _measure(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    sky: np.ndarray,
    noise: np.ndarray,
    *,
    all_xy: np.ndarray,
    coarse_sky: np.ndarray,
    sky_binning: int,
    saturation: float | None,
    threshold: float,
    fwhm_guess: float,
    max_fit: int,
) -> tuple[StarList, np.ndarray]:
    """Moments, photometry and Moffat fits on full-resolution stamps of the given candidates.

    Returns the star list and the (n, 2) refined positions of all the candidates.
    """
    h, w = image.shape
    r = int(np.clip(np.ceil(2.5 * fwhm_guess), 6, 40))
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    raw, inside = _gather(image, ix, iy, r)
    # Moments and photometry take the detection's local sky (a median over 3-5 FWHM), which
    # also follows the edge of a nebula or a filament beside the star.
    patches = np.where(inside, raw - _stamp_sky(coarse_sky, sky_binning, ix, iy, r), 0.0)
    patches = patches.astype(np.float32, copy=False)
    s0 = max(0.8, fwhm_guess / FWHM_PER_SIGMA)
    cx, cy, sigma, ecc, ok = _adaptive_moments(patches, r, s_init=s0)
    xs = ix + cx
    ys = iy + cy
    # Aperture photometry on the same patches: radius 2 FWHM, or the patch, whichever is less.
    grid = np.arange(-r, r + 1, dtype=np.float32)
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    rad = np.clip(2.0 * sigma * FWHM_PER_SIGMA, 2.0, r)
    aperture = ((dx * dx + dy * dy) <= (rad * rad)[:, None, None]) & inside
    flux = np.where(aperture, patches, 0).sum(axis=(1, 2))
    npix = aperture.sum(axis=(1, 2))
    snr = flux / (noise * np.sqrt(np.maximum(npix, 1)))
    peak = patches[:, r, r]
    if saturation is not None:
        saturated = raw[:, r - 1 : r + 2, r - 1 : r + 2].max(axis=(1, 2)) >= saturation
    else:
        saturated = np.zeros(x.size, bool)
    # Hot pixels and cosmic rays are sharper than any optics can make a star.
    ok &= (sigma > 0.55) & (sigma < 3.0 * r) & (flux > 0)
    ok &= (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    # Knots of nebulosity, galaxies and blends pass the threshold too, but they are wider than
    # the PSF and scattered over every size, while stars share one size: keep the mode.
    psf = _typical_sigma(sigma[ok & ~saturated], snr[ok & ~saturated])
    if psf is not None:
        ok &= saturated | ((sigma > 0.6 * psf) & (sigma < 1.7 * psf))
    # A saturated star bigger than its stamp defeats the moments, but it is the best star
    # registration has: keep it where it was detected.
    lost = saturated & ~ok & (flux > 0)
    xs = np.where(lost, x, xs)
    ys = np.where(lost, y, ys)
    ok |= lost

    # Moffat fits of the brightest good stars that have no other detection in their stamp.
    fit_idx = np.flatnonzero(ok & ~saturated & (snr >= 20))
    fit_idx = fit_idx[np.argsort(-snr[fit_idx])][: 2 * max_fit]
    fit_idx = fit_idx[_isolated(all_xy, x[fit_idx], y[fit_idx], 1.2 * r)][:max_fit]
    n = x.size
    fwhm = np.full(n, np.nan)
    hfr = np.full(n, np.nan)
    beta = np.full(n, np.nan)
    fitted = np.zeros(n, bool)
    if fit_idx.size:
        fit_raw = raw[fit_idx]
        plane = _rim_plane(fit_raw, inside[fit_idx], sky[fit_idx], r)
        fit = _fit_moffat(
            np.where(inside[fit_idx], fit_raw - plane, 0.0).astype(np.float32),
            inside[fit_idx],
            r,
            cx[fit_idx],
            cy[fit_idx],
            sigma[fit_idx],
            radius=float(np.clip(2.2 * fwhm_guess, 4.0, r)),
        )
        good_fit = fit.ok
        sel = fit_idx[good_fit]
        fwhm[sel] = fit.fwhm[good_fit]
        hfr[sel] = fit.hfr[good_fit]
        beta[sel] = fit.beta[good_fit]
        fitted[sel] = True
        xs[sel] = ix[sel] + fit.x[good_fit]
        ys[sel] = iy[sel] + fit.y[good_fit]
    moment_fwhm = sigma.astype(np.float64) * FWHM_PER_SIGMA
    if fitted.sum() >= 3:
        fwhm_ratio = float(np.median(fwhm[fitted] / moment_fwhm[fitted]))
        hfr_ratio = float(np.median(hfr[fitted] / moment_fwhm[fitted]))
    else:
        # Gaussian stars: HFR = sigma sqrt(2 ln 2) = FWHM / 2.
        fwhm_ratio, hfr_ratio = 1.0, 0.5
    fwhm = np.where(fitted, fwhm, moment_fwhm * fwhm_ratio)
    hfr = np.where(fitted, hfr, moment_fwhm * hfr_ratio)

    # Nebular texture that the size test lets through is elongated where stars are round (or
    # all equally elongated, when the guiding trailed them): drop clear outliers.
    e = ecc.astype(np.float64) ** 2 / (2.0 - ecc.astype(np.float64) ** 2)  # (a^2-b^2)/(a^2+b^2)
    bright = ok & ~saturated & (snr >= 20)
    if bright.sum() >= 5:
        ok &= saturated | (e <= max(0.6, float(np.median(e[bright])) + 0.3))
    # The star list, which registration and the shape statistics use, keeps the candidates
    # whose aperture SNR clears the threshold too. Every candidate still counts as a detection
    # (at its refined position where the moments converged): the count must not depend on how
    # many candidates were measured.
    detected = np.column_stack([np.where(ok, xs, x), np.where(ok, ys, y)]).astype(np.float64)
    ok &= saturated | (snr > threshold)
    order = np.argsort(-flux[ok])
    sel = np.flatnonzero(ok)[order]
    stars = StarList(
        x=xs[sel].astype(np.float64),
        y=ys[sel].astype(np.float64),
        flux=flux[sel].astype(np.float64),
        peak=peak[sel].astype(np.float64),
        sigma=sigma[sel].astype(np.float64),
        eccentricity=ecc[sel].astype(np.float64),
        saturated=saturated[sel],
        snr=snr[sel].astype(np.float64),
        fwhm=fwhm[sel],
        hfr=hfr[sel],
        beta=beta[sel],
        fitted=fitted[sel],
    )
    return _deduplicate(stars, min_sep=1.5), detected


def _isolated(points: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """True where no point other than the query itself lies within ``radius`` of (x, y)."""
    if x.size == 0:
        return np.zeros(0, bool)
    order = np.argsort(points[:, 0])
    px, py = points[order, 0], points[order, 1]
    lo = np.searchsorted(px, x - radius, side="left")
    hi = np.searchsorted(px, x + radius, side="right")
    width = int((hi - lo).max())
    idx = np.minimum(lo[:, None] + np.arange(width)[None, :], px.size - 1)
    valid = np.arange(width)[None, :] < (hi - lo)[:, None]
    d2 = (px[idx] - x[:, None]) ** 2 + (py[idx] - y[:, None]) ** 2
    near = valid & (d2 <= radius * radius)
    return near.sum(axis=1) <= 1  # the query point itself is among the points


def _stamp_sky(coarse: np.ndarray, factor: int, ix: np.ndarray, iy: np.ndarray, r: int):
    """The bilinear local sky under (N, 2r+1, 2r+1) stamps centred on ``ix, iy``.

    Bilinear interpolation is separable: each stamp's sky is ``Wy @ G @ Wx.T``, with ``G`` the
    few coarse cells under the stamp and ``Wy``, ``Wx`` the interpolation weights, which
    depend only on the stamp centre's position within its cell.
    """
    gh, gw = coarse.shape
    offs = np.arange(-r, r + 1)
    span = (2 * r) // factor + 3  # coarse cells a stamp's interpolation can touch

    def weights(centre: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        u = np.clip((centre[:, None] + offs[None, :] - (factor - 1) / 2.0) / factor, 0, size - 1)
        first = np.floor(u[:, 0]).astype(np.int64)
        first = np.clip(first, 0, max(size - span, 0))
        k0 = np.minimum(np.floor(u).astype(np.int64), size - 1) - first[:, None]
        frac = u - np.floor(u)
        mat = np.zeros((centre.size, offs.size, span))
        rows = np.arange(offs.size)[None, :]
        n_idx = np.arange(centre.size)[:, None]
        mat[n_idx, rows, np.clip(k0, 0, span - 1)] += 1.0 - frac
        mat[n_idx, rows, np.clip(k0 + 1, 0, span - 1)] += frac
        return mat, first

    wy, y0 = weights(iy, gh)
    wx, x0 = weights(ix, gw)
    cells_y = np.clip(y0[:, None] + np.arange(span)[None, :], 0, gh - 1)
    cells_x = np.clip(x0[:, None] + np.arange(span)[None, :], 0, gw - 1)
    g = coarse[cells_y[:, :, None], cells_x[:, None, :]].astype(np.float64)
    return np.matmul(np.matmul(wy, g), wx.transpose(0, 2, 1)).astype(np.float32)


def _rim_plane(raw: np.ndarray, inside: np.ndarray, sky: np.ndarray, r: int) -> np.ndarray:
    """A plane through the medians of each stamp's four sides (two pixels deep).

    Where a side lies off the frame the star's local sky stands in, flat.
    """
    n = raw.shape[0]

    def sides(a: np.ndarray) -> np.ndarray:
        t = a.transpose(0, 2, 1)
        return np.stack([a[:, :2], a[:, -2:], t[:, :2], t[:, -2:]], axis=1).reshape(n, 4, -1)

    values, ins = sides(raw), sides(inside)
    med = np.median(values, axis=2)  # top, bottom, left, right
    edge = ~ins.all(axis=(1, 2))
    if edge.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med[edge] = np.nanmedian(np.where(ins[edge], values[edge], np.nan), axis=2)
    full = np.isfinite(med).all(axis=1)
    med = np.where(np.isfinite(med), med, sky[:, None])
    centre = np.where(full, med.mean(axis=1), sky)
    slope_y = np.where(full, (med[:, 1] - med[:, 0]) / (2 * r - 1), 0.0)
    slope_x = np.where(full, (med[:, 3] - med[:, 2]) / (2 * r - 1), 0.0)
    offs = np.arange(-r, r + 1, dtype=np.float64)
    plane = (
        centre[:, None, None]
        + slope_y[:, None, None] * offs[None, :, None]
        + slope_x[:, None, None] * offs[None, None, :]
    )
    return plane.astype(np.float32)


def _typical_sigma(sigma: np.ndarray, snr: np.ndarray) -> float | None:
    """The stars' common size: the smallest well-populated mode of log sigma (0.05 dex bins).

    Nothing real is sharper than the PSF, and nebular knots and blends are always wider and
    can outnumber the stars in a rich field, so the *first* strong peak, not the highest, is
    the PSF.
    """
    clear = sigma[snr > 10] if (snr > 10).sum() >= 5 else sigma
    if clear.size < 5:
        return None
    logs = np.log10(clear)
    bins = np.arange(logs.min(), logs.max() + 0.1, 0.05)
    if bins.size < 4:
        return float(np.median(clear))
    hist, edges = np.histogram(logs, bins=bins)
    hist = np.convolve(hist, [1, 2, 1], mode="same")  # no single lucky bin
    strong = hist >= 0.3 * hist.max()
    k = 0
    while not (strong[k] and (k + 1 >= hist.size or hist[k] >= hist[k + 1])):
        k += 1
    near = np.abs(logs - 0.5 * (edges[k] + edges[k + 1])) < 0.1
    return float(10 ** np.median(logs[near]))


def _adaptive_moments(
    patches: np.ndarray, r: int, s_init: float, iterations: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centroid offset, Gaussian-equivalent sigma and eccentricity of each patch's star."""
    n = patches.shape[0]
    grid = np.arange(-r, r + 1, dtype=np.float32)
    cx = np.zeros(n, np.float32)
    cy = np.zeros(n, np.float32)
    s2 = np.full(n, s_init * s_init, np.float32)
    mxx = myy = mxy = np.zeros(n, np.float32)
    ok = np.ones(n, bool)
    for _ in range(iterations):
        dx = grid[None, :] - cx[:, None]  # (n, 2r+1) along x
        dy = grid[None, :] - cy[:, None]
        inv = (-0.5 / s2)[:, None]
        wx = np.exp(dx * dx * inv)  # the Gaussian window is separable
        wy = np.exp(dy * dy * inv)
        # The window is separable, so every weighted sum is a product of small matrices:
        # (weights along y) @ patch @ (weights along x), for all stars at once.
        col = np.matmul(wy[:, None, :], patches)[:, 0, :]  # (n, 2r+1): y summed out
        row = np.matmul(patches, wx[:, :, None])[:, :, 0]  # x summed out
        cw = col * wx
        rw = row * wy
        tot = cw.sum(axis=1)
        ok &= tot > 0
        tot = np.where(tot > 0, tot, 1.0)
        ex = (cw * dx).sum(axis=1) / tot
        ey = (rw * dy).sum(axis=1) / tot
        mxx = (cw * dx * dx).sum(axis=1) / tot
        myy = (rw * dy * dy).sum(axis=1) / tot
        wyd = (wy * dy)[:, None, :]
        mxy = np.matmul(np.matmul(wyd, patches), (wx * dx)[:, :, None])[:, 0, 0] / tot
        # A Gaussian window of sigma s on a Gaussian star of sigma t measures t^2 s^2/(t^2+s^2),
        # so the first moment under-shifts by the same factor: correct for it to converge fast.
        m = np.clip(0.5 * (mxx + myy), 1e-3, None)
        gain = np.clip(s2 / np.maximum(s2 - m, 1e-3), 1.0, 4.0)
        cx = np.clip(cx + ex * gain, -r / 2, r / 2)
        cy = np.clip(cy + ey * gain, -r / 2, r / 2)
        new_s2 = np.clip(2.0 * m, 0.09, (r / 1.5) ** 2)
        done = (np.abs(ex * gain) < 1e-3).all() and (np.abs(ey * gain) < 1e-3).all()
        done = done and bool((np.abs(new_s2 - s2) < 1e-3 * s2).all())
        s2 = new_s2
        if done:
            break
    # A window that grew to its cap never matched the object: too big for a star at this scale.
    ok &= s2 < 0.9 * (r / 1.5) ** 2
    sigma = np.sqrt(s2)
    # Window-corrected moments: 1/t_i^2 = 1/M_i - 1/s^2 along each principal axis.
    tr = mxx + myy
    det_term = np.sqrt(np.maximum(((mxx - myy) / 2) ** 2 + mxy**2, 0))
    l1 = tr / 2 + det_term
    l2 = np.maximum(tr / 2 - det_term, 1e-6)
    t1 = l1 * s2 / np.maximum(s2 - l1, 1e-3)
    t2 = l2 * s2 / np.maximum(s2 - l2, 1e-3)
    ecc = np.sqrt(np.clip(1.0 - t2 / np.maximum(t1, 1e-6), 0.0, 1.0))
    ok &= np.isfinite(sigma) & np.isfinite(cx) & np.isfinite(cy)
    ok &= (np.abs(cx) < r / 2) & (np.abs(cy) < r / 2)
    return cx, cy, sigma.astype(np.float32), ecc.astype(np.float32), ok


@dataclass
class _MoffatFit:
    x: np.ndarray  # centre offset from the stamp centre, px
    y: np.ndarray
    fwhm: np.ndarray
    beta: np.ndarray
    hfr: np.ndarray
    ok: np.ndarray


def _fit_moffat(
    patches: np.ndarray,
    inside: np.ndarray,
    r: int,
    cx: np.ndarray,
    cy: np.ndarray,
    sigma: np.ndarray,
    radius: float,
    iterations: int = 20,
) -> _MoffatFit:
    """Damped Gauss-Newton fit of ``A (1 + c r^2 / FWHM^2)^-beta + B`` to every stamp at once.

    ``c = 4 (2^(1/beta) - 1)`` puts the half maximum at ``r = FWHM / 2`` whatever beta is.
    The shape parameter is ``q = 1 / beta`` (0 is a Gaussian, which the fit may approach
    without anything diverging). Only pixels within ``radius`` of the stamp's centre count:
    the wings out to there pin beta, and a neighbour further out cannot pull the fit.

    A star leaves the iterations once its step is accepted and moves the FWHM by less than
    1e-4; the rest go on alone. A parameter on its bound that the gradient pushes further out
    is held there: solved for as if free, its step is clipped and spoils the others', and
    such a star (a near-Gaussian one with beta at its bound) used every iteration and still
    had not converged.
    """
    n = patches.shape[0]
    grid = np.arange(-r, r + 1, dtype=np.float64)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    disc = (gx * gx + gy * gy).ravel() <= radius * radius
    gx = gx.ravel()[disc][None, :]
    gy = gy.ravel()[disc][None, :]
    data = patches.reshape(n, -1)[:, disc].astype(np.float64)
    weight = inside.reshape(n, -1)[:, disc].astype(np.float64)
    fwhm0 = np.clip(0.9 * sigma.astype(np.float64) * FWHM_PER_SIGMA, 0.8, 2.0 * r)
    d2 = (gx - cx[:, None]) ** 2 + (gy - cy[:, None]) ** 2
    near = d2 <= np.maximum(0.25, (0.25 * fwhm0) ** 2)[:, None]
    amp0 = np.where(near, data, -np.inf).max(axis=1)
    amp0 = np.where(np.isfinite(amp0) & (amp0 > 0), amp0, np.maximum(data.max(axis=1), 1e-3))
    p = np.column_stack(
        [cx.astype(np.float64), cy.astype(np.float64), amp0, fwhm0, np.full(n, 0.3), np.zeros(n)]
    )
    lam = np.full(n, 1e-2)
    lo = np.array([-r / 2, -r / 2, 0.0, 0.5, 0.02, -np.inf])
    hi = np.array([r / 2, r / 2, np.inf, 2.0 * r, 0.8, np.inf])

    def model(par: np.ndarray, jac: bool) -> tuple[np.ndarray, np.ndarray | None]:
        x0, y0, a, fw, q, b = (par[:, k : k + 1] for k in range(6))
        ddx = gx - x0
        ddy = gy - y0
        rho2 = ddx * ddx + ddy * ddy
        c = 4.0 * (np.exp2(q) - 1.0)
        t = c * rho2 / (fw * fw)
        u = 1.0 + t
        lnu = np.log(u)
        m = np.exp(-lnu / q)
        f = a * m + b
        if not jac:
            return f, None
        common = a * m / (q * u) * c / (fw * fw)
        dc_dq = 4.0 * math.log(2.0) * np.exp2(q)
        j = np.empty((par.shape[0], gx.shape[1], 6))
        j[:, :, 0] = common * 2.0 * ddx
        j[:, :, 1] = common * 2.0 * ddy
        j[:, :, 2] = m
        j[:, :, 3] = common * 2.0 * rho2 / fw
        j[:, :, 4] = a * m * (lnu / (q * q) - dc_dq * rho2 / (fw * fw) / (q * u))
        j[:, :, 5] = 1.0
        return f, j

    f, _ = model(p, False)
    cost = (weight * (data - f) ** 2).sum(axis=1)
    active = np.arange(n)
    for _ in range(iterations):
        if active.size == 0:
            break
        pa, da, wa, la, ca = p[active], data[active], weight[active], lam[active], cost[active]
        f, j = model(pa, True)
        assert j is not None
        res = wa * (da - f)
        jw = j * wa[:, :, None]
        hess = np.matmul(jw.transpose(0, 2, 1), j)
        grad = np.matmul(j.transpose(0, 2, 1), res[:, :, None])[:, :, 0]
        pinned = ((pa <= lo) & (grad < 0)) | ((pa >= hi) & (grad > 0))
        if pinned.any():
            free = ~pinned
            hess = hess * (free[:, :, None] & free[:, None, :]) + pinned[:, :, None] * np.eye(6)
            grad = np.where(pinned, 0.0, grad)
        diag = np.einsum("nii->ni", hess)
        damped = hess + (la[:, None] * np.maximum(diag, 1e-12))[:, :, None] * np.eye(6)
        try:
            step = np.linalg.solve(damped, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(pa)
        trial = np.clip(pa + step, lo, hi)
        f_trial, _ = model(trial, False)
        trial_cost = (wa * (da - f_trial) ** 2).sum(axis=1)
        better = np.isfinite(trial_cost) & (trial_cost <= ca)
        small = np.abs(step[:, 3]) < 1e-4 * pa[:, 3]
        p[active] = np.where(better[:, None], trial, pa)
        cost[active] = np.where(better, trial_cost, ca)
        lam[active] = np.where(better, la / 4.0, la * 4.0)
        active = active[~(better & small)]
    q = p[:, 4]
    fw = p[:, 3]
    alpha = fw / (2.0 * np.sqrt(np.exp2(q) - 1.0))
    beta = 1.0 / q
    hfr = alpha * np.sqrt(np.exp2(q / (1.0 - q)) - 1.0)
    ok = (
        np.isfinite(cost)
        & (p[:, 2] > 0)
        & (fw > 0.55)
        & (fw < 1.9 * r)
        & (q < 0.79)
        & np.isfinite(hfr)
    )
    return _MoffatFit(x=p[:, 0], y=p[:, 1], fwhm=fw, beta=beta, hfr=hfr, ok=ok)


def _deduplicate(stars: StarList, min_sep: float) -> StarList:
    """Two candidates converging on one star (a saturated plateau) keep the brighter one."""
    if len(stars) < 2:
        return stars
    tree = cKDTree(np.column_stack([stars.x, stars.y]))
    pairs = tree.query_pairs(min_sep, output_type="ndarray")
    if pairs.size == 0:
        return stars
    drop = np.zeros(len(stars), bool)
    drop[np.maximum(pairs[:, 0], pairs[:, 1])] = True  # brightest first: the later index goes
    return stars.select(~drop)
