"""The numbers that describe one sub: background, noise, stars, FWHM, roundness, SNR, gradient.

These are what the quality gates judge and what ``frames.jsonl`` and the dashboards show. SNR
here is the background-limited signal-to-noise of the brightest unsaturated stars: the median,
over the ``SNR_STARS`` unsaturated stars of highest flux, of aperture flux / (noise x
sqrt(aperture pixels)). Taking a fixed number of the brightest, rather than every detected star,
matters: clouds erase the faint stars first, and a median over the survivors would *rise*.
It is cheap, needs no gain in e-/ADU (which headers rarely give), falls with clouds, haze and
bad focus, and grows as sqrt(N) in a stack, which is what a live stack must show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from subwatch.measure.background import Background, Gradient, estimate_background, measure_gradient
from subwatch.measure.stars import StarList, detect_stars

SNR_STARS = 25


@dataclass
class FrameMeasurement:
    background: Background
    gradient: Gradient
    stars: StarList
    fwhm: float | None  # px, median over good stars
    eccentricity: float | None
    snr: float | None

    @property
    def n_stars(self) -> int:
        return len(self.stars)


def luminance(image: np.ndarray) -> np.ndarray:
    """A 2D view for measuring: colour frames are measured on the mean of their channels."""
    return image if image.ndim == 2 else image.mean(axis=2, dtype=np.float32)


def measure_frame(
    image: np.ndarray,
    *,
    saturation: float | None = None,
    fwhm_guess: float = 3.0,
    threshold: float = 5.0,
) -> FrameMeasurement:
    """Measure a calibrated frame (ADU). ``saturation`` is the level of clipped star cores."""
    lum = luminance(image)
    bkg = estimate_background(lum)
    residual = lum - bkg.full(lum.shape)

    def detect(guess: float) -> StarList:
        return detect_stars(
            residual,
            bkg.noise,
            raw=lum,
            saturation=saturation,
            threshold=threshold,
            fwhm_guess=guess,
        )

    stars = detect(fwhm_guess)
    fwhm = _median_fwhm(stars)
    if fwhm is not None and fwhm > 1.6 * fwhm_guess:
        # Stars much wider than the matched filter and patches assumed (bad seeing, defocus):
        # detect again at their scale.
        stars = detect(fwhm)
        fwhm = _median_fwhm(stars)
    good = _shape_sample(stars)
    return FrameMeasurement(
        background=bkg,
        gradient=measure_gradient(bkg, lum.shape),
        stars=stars,
        fwhm=fwhm,
        eccentricity=float(np.median(stars.eccentricity[good])) if good.any() else None,
        snr=bright_star_snr(stars),
    )


def bright_star_snr(stars: StarList, count: int = SNR_STARS) -> float | None:
    """Median SNR of the ``count`` unsaturated stars of highest flux (see the module doc)."""
    unsat = np.flatnonzero(~stars.saturated)
    if unsat.size == 0:
        return None
    brightest = unsat[np.argsort(-stars.flux[unsat])[:count]]
    return float(np.median(stars.snr[brightest]))


def _shape_sample(stars: StarList) -> np.ndarray:
    """Stars to take shape statistics from; poor frames fall back to whatever was detected."""
    good = stars.good()
    return good if good.sum() >= 3 else ~stars.saturated


def _median_fwhm(stars: StarList) -> float | None:
    good = _shape_sample(stars)
    return float(np.median(stars.fwhm[good])) if good.any() else None
