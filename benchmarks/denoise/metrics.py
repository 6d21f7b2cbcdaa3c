"""How a denoised frame is judged against its noiseless truth.

* ``psnr_gat`` / ``ssim_gat``: in the *stretched* domain: the generalised Anscombe transform
  with the true noise model (a square-root stretch where one noise sigma is one unit at every
  level, so faint nebula and bright cores weigh alike, as on a stretched screen). Peak: the
  truth's 99.9th percentile above its median, in that domain.
* ``psnr_linear``: in linear ADU; peak: the truth's 99.9th percentile above its median (the
  brightest star peaks would make any error look small).
* ``faint_rms``: RMS error over pixels whose true signal is less than one noise sigma above
  the sky (where noise hides the most), in units of that sigma; the noisy input is about 1.
* ``flux`` / ``fwhm``: isolated stars (no other star's peak above 1 % of theirs within 6
  FWHM, 6 FWHM from the border) with aperture SNR >= 30 in the noisy frame. Flux: sum over a
  radius of 2 FWHM of the result minus the true star-free sky, over the true star flux there.
  FWHM: a circular Gaussian fitted to the same stamp, over the fit to the true star. Medians
  over the stars, and the share within 2 % (flux) and 5 % (FWHM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from heldout import Frame
from scipy import ndimage, optimize

from subwatch.enhance.vst import forward

FAINT_SIGMAS = 1.0
STAR_SNR = 30.0


def _psnr(err: np.ndarray, peak: float) -> float:
    return float(10.0 * np.log10(peak * peak / max(float(np.mean(err * err)), 1e-30)))


def image_scores(frame: Frame, estimate: np.ndarray) -> dict[str, float]:
    from skimage.metrics import structural_similarity

    truth = frame.truth
    est = np.asarray(estimate, np.float64)
    gt, ge = forward(truth, frame.noise_model), forward(est, frame.noise_model)
    peak_gat = float(np.percentile(gt, 99.9) - np.median(gt))
    peak_lin = float(np.percentile(truth, 99.9) - np.median(truth))
    faint = (frame.scene.clean - frame.scene.sky) < FAINT_SIGMAS * frame.sigma
    return {
        "psnr_gat": _psnr(ge - gt, peak_gat),
        "ssim_gat": float(structural_similarity(gt, ge, data_range=peak_gat)),
        "psnr_linear": _psnr(est - truth, peak_lin),
        "faint_rms": float(np.sqrt(np.mean((est - truth)[faint] ** 2)) / frame.sigma),
    }


@dataclass
class Star:
    y: int
    x: int


def isolated_stars(frame: Frame) -> list[Star]:
    """Peaks of the true star image that are isolated and bright enough (see module doc)."""
    stars = frame.scene.stars
    fwhm = frame.scene.fwhm
    peaks = (stars == ndimage.maximum_filter(stars, size=3)) & (stars > 0.5 * frame.sigma)
    ys, xs = np.nonzero(peaks)
    values = stars[ys, xs]
    h, w = stars.shape
    edge, near, r = 6 * fwhm, 6 * fwhm, 2 * fwhm
    found = []
    for y, x, v in zip(ys, xs, values, strict=True):
        if not (edge <= y < h - edge and edge <= x < w - edge):
            continue
        d = np.hypot(ys - y, xs - x)
        if ((d > 0) & (d < near) & (values > 0.01 * v)).any():
            continue
        yy, xx = np.ogrid[-int(r) : int(r) + 1, -int(r) : int(r) + 1]
        ap = (yy * yy + xx * xx) <= r * r
        stamp = (slice(y - int(r), y + int(r) + 1), slice(x - int(r), x + int(r) + 1))
        flux = float(stars[stamp][ap].sum())
        var = frame.noise_model.std(frame.truth[stamp][ap]) ** 2
        if flux / np.sqrt(var.sum()) >= STAR_SNR:
            found.append(Star(int(y), int(x)))
    return found


def _gauss_fwhm(stamp: np.ndarray) -> float:
    n = stamp.shape[0]
    yy, xx = np.mgrid[0:n, 0:n] - n // 2

    def resid(p: np.ndarray) -> np.ndarray:
        a, y0, x0, s = p
        return (a * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * s * s)) - stamp).ravel()

    fit = optimize.least_squares(resid, [stamp.max(), 0.0, 0.0, 1.5], method="lm")
    return float(2.3548 * abs(fit.x[3]))


def star_scores(frame: Frame, estimate: np.ndarray, stars: list[Star]) -> dict[str, float]:
    """Median flux and FWHM ratios (estimate / truth) and the shares within tolerance."""
    if not stars:
        return {"stars": 0}
    fwhm = frame.scene.fwhm
    r = 2 * fwhm
    ri = int(np.ceil(r))
    yy, xx = np.ogrid[-ri : ri + 1, -ri : ri + 1]
    ap = (yy * yy + xx * xx) <= r * r
    base = frame.truth - frame.scene.stars  # the true sky and emission under the stars
    flux, size = [], []
    for s in stars:
        win = (slice(s.y - ri, s.y + ri + 1), slice(s.x - ri, s.x + ri + 1))
        true_star = frame.scene.stars[win]
        got = np.asarray(estimate, np.float64)[win] - base[win]
        flux.append(got[ap].sum() / true_star[ap].sum())
        size.append(_gauss_fwhm(got) / _gauss_fwhm(true_star))
    flux_a, size_a = np.array(flux), np.array(size)
    return {
        "stars": len(stars),
        "flux_ratios": [round(float(v), 5) for v in flux_a],
        "fwhm_ratios": [round(float(v), 5) for v in size_a],
        "flux": float(np.median(flux_a)),
        "flux_within_2pc": float(np.mean(np.abs(flux_a - 1) <= 0.02)),
        "fwhm": float(np.median(size_a)),
        "fwhm_within_5pc": float(np.mean(np.abs(size_a - 1) <= 0.05)),
    }
