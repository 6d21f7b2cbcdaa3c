"""Star detection and shape measurement, fast enough for every sub of a 26 MP camera.

Detection: the background-subtracted image is smoothed with a Gaussian close to a star's size
(a matched filter: it lifts stars above the noise and flattens single-pixel hot pixels and
cosmic rays), local maxima above ``threshold`` sigma of the smoothed noise are candidates.

Measurement: each candidate gets *adaptive moments* (the method of Bernstein & Jarvis 2002):
an elliptical-star-agnostic Gaussian window is re-centred on the star and resized until its size
matches the star's own second moments. At that fixed point the window's sigma is the star's
Gaussian-equivalent sigma, so FWHM = 2.3548 sigma; the window-corrected second-moment matrix
gives the eccentricity, and the weighted first moments give a centroid good to a few
hundredths of a pixel, which registration needs. All candidates are measured together as a
stack of small patches, so the cost is a few numpy passes, not a Python loop per star.
Candidates narrower than a real PSF (hot pixels, cosmic rays) or that do not converge are
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass
class StarList:
    """Detected stars, brightest first. Coordinates are 0-based pixels, x = column."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray  # ADU in the aperture, background subtracted
    peak: np.ndarray  # ADU above background
    sigma: np.ndarray  # Gaussian-equivalent sigma, px
    eccentricity: np.ndarray
    saturated: np.ndarray  # bool
    snr: np.ndarray  # background-limited aperture SNR

    def __len__(self) -> int:
        return int(self.x.size)

    @property
    def fwhm(self) -> np.ndarray:
        return self.sigma * FWHM_PER_SIGMA

    def xyf(self) -> np.ndarray:
        """(N, 3) array of x, y, flux, the form registration takes."""
        return np.column_stack([self.x, self.y, self.flux])

    def good(self) -> np.ndarray:
        """Stars fit for shape statistics: unsaturated and clearly detected."""
        return (~self.saturated) & (self.snr >= 10)

    @classmethod
    def empty(cls) -> StarList:
        z = np.zeros(0)
        return cls(z, z, z, z, z, z, np.zeros(0, bool), z)


def _gather(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, r: int) -> np.ndarray:
    """(N, 2r+1, 2r+1) patches centred on integer pixels; outside the image reads as zero."""
    padded = cv2.copyMakeBorder(image, r, r, r, r, cv2.BORDER_CONSTANT, value=0)
    offs = np.arange(-r, r + 1)
    rows = (ys[:, None] + r + offs[None, :])[:, :, None]
    cols = (xs[:, None] + r + offs[None, :])[:, None, :]
    return padded[rows, cols]


def detect_stars(
    residual: np.ndarray,
    noise: float,
    *,
    raw: np.ndarray | None = None,
    saturation: float | None = None,
    threshold: float = 5.0,
    fwhm_guess: float = 3.0,
    max_candidates: int = 1500,
) -> StarList:
    """Detect and measure stars on a background-subtracted 2D image (ADU).

    ``raw`` (the image before background subtraction) and ``saturation`` mark stars whose
    brightest pixel reached the sensor's ceiling: they are fine for registration, useless for
    FWHM and photometry.
    """
    if residual.ndim != 2:
        raise ValueError("detect_stars expects a 2D image")
    if not np.isfinite(noise) or noise <= 0:
        return StarList.empty()
    img = np.ascontiguousarray(residual, dtype=np.float32)
    s = max(0.8, fwhm_guess / FWHM_PER_SIGMA)
    smooth = cv2.GaussianBlur(img, (0, 0), sigmaX=s, sigmaY=s)
    # Noise of the smoothed image: white noise is reduced by 1/(2 sqrt(pi) s).
    noise_s = noise / (2.0 * np.sqrt(np.pi) * s)
    kernel = np.ones((5, 5), np.uint8)
    local_max = cv2.dilate(smooth, kernel)
    cand = (smooth >= local_max) & (smooth > threshold * noise_s)
    ys, xs = np.nonzero(cand)
    if xs.size == 0:
        return StarList.empty()
    strength = smooth[ys, xs]
    if xs.size > max_candidates:
        keep = np.argpartition(-strength, max_candidates)[:max_candidates]
        xs, ys, strength = xs[keep], ys[keep], strength[keep]
    r = int(np.clip(np.ceil(2.5 * fwhm_guess), 6, 40))
    patches = _gather(img, xs, ys, r)
    cx, cy, sigma, ecc, ok = _adaptive_moments(patches, r, s_init=s)
    x = xs + cx
    y = ys + cy
    # Aperture photometry on the same patches: radius 2 FWHM, or the patch, whichever is less.
    grid = np.arange(-r, r + 1, dtype=np.float32)
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    rad = np.clip(2.0 * sigma * FWHM_PER_SIGMA, 2.0, r)
    inside = (dx * dx + dy * dy) <= (rad * rad)[:, None, None]
    flux = np.where(inside, patches, 0).sum(axis=(1, 2))
    npix = inside.sum(axis=(1, 2))
    snr = flux / (noise * np.sqrt(np.maximum(npix, 1)))
    peak = patches[:, r, r]
    if raw is not None and saturation is not None:
        raw_patch = _gather(np.ascontiguousarray(raw, dtype=np.float32), xs, ys, 1)
        saturated = raw_patch.max(axis=(1, 2)) >= saturation
    else:
        saturated = np.zeros(xs.size, bool)
    # Hot pixels and cosmic rays are sharper than any optics can make a star.
    ok &= (sigma > 0.55) & (sigma < 3.0 * r) & (flux > 0) & (snr > threshold)
    ok &= (x >= 0) & (x <= img.shape[1] - 1) & (y >= 0) & (y <= img.shape[0] - 1)
    # Knots of nebulosity, galaxies and blends pass the threshold too, but they are wider than
    # the PSF and scattered over every size, while stars share one size: keep the mode.
    psf = _typical_sigma(sigma[ok], snr[ok])
    if psf is not None:
        ok &= (sigma > 0.6 * psf) & (sigma < 1.7 * psf)
    order = np.argsort(-flux[ok])
    sel = np.flatnonzero(ok)[order]
    stars = StarList(
        x=x[sel].astype(np.float64),
        y=y[sel].astype(np.float64),
        flux=flux[sel].astype(np.float64),
        peak=peak[sel].astype(np.float64),
        sigma=sigma[sel].astype(np.float64),
        eccentricity=ecc[sel].astype(np.float64),
        saturated=saturated[sel],
        snr=snr[sel].astype(np.float64),
    )
    return _deduplicate(stars, min_sep=1.5)


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
        dx = grid[None, None, :] - cx[:, None, None]
        dy = grid[None, :, None] - cy[:, None, None]
        w = np.exp(-(dx * dx + dy * dy) / (2.0 * s2[:, None, None]))
        iw = patches * w
        tot = iw.sum(axis=(1, 2))
        ok &= tot > 0
        tot = np.where(tot > 0, tot, 1.0)
        ex = (iw * dx).sum(axis=(1, 2)) / tot
        ey = (iw * dy).sum(axis=(1, 2)) / tot
        mxx = (iw * dx * dx).sum(axis=(1, 2)) / tot
        myy = (iw * dy * dy).sum(axis=(1, 2)) / tot
        mxy = (iw * dx * dy).sum(axis=(1, 2)) / tot
        # A Gaussian window of sigma s on a Gaussian star of sigma t measures t^2 s^2/(t^2+s^2),
        # so the first moment under-shifts by the same factor: correct for it to converge fast.
        m = np.clip(0.5 * (mxx + myy), 1e-3, None)
        gain = np.clip(s2 / np.maximum(s2 - m, 1e-3), 1.0, 4.0)
        cx = np.clip(cx + ex * gain, -r / 2, r / 2)
        cy = np.clip(cy + ey * gain, -r / 2, r / 2)
        s2 = np.clip(2.0 * m, 0.09, (r / 1.5) ** 2)
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
    keep = ~drop
    return StarList(*(getattr(stars, f)[keep] for f in StarList.__dataclass_fields__))
