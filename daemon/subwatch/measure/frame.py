"""The numbers that describe one sub: background, noise, stars, FWHM, HFR, roundness, SNR.

These are what the quality gates judge and what ``frames.jsonl`` and the dashboards show.

FWHM and HFR (px) are medians over the brightest isolated unsaturated stars, each fitted
with a Moffat profile (see ``stars``): FWHM is the profile's full width at half maximum, HFR
the radius that encloses half of the profile's total flux, wings included. (Programs that
sum pixels within a finite aperture report a somewhat smaller HFR for the same star.)

SNR here is the background-limited signal-to-noise of the brightest unsaturated stars: the
median, over the ``SNR_STARS`` unsaturated stars of highest flux, of aperture flux / (noise x
sqrt(aperture pixels)). Taking a fixed number of the brightest, rather than every detected
star, matters: clouds erase the faint stars first, and a median over the survivors would
*rise*. It is cheap, needs no gain in e-/ADU (which headers rarely give), falls with clouds,
haze and bad focus, and grows as sqrt(N) in a stack, which is what a live stack must show.

``n_stars`` counts every detection above threshold (hot pixels and cosmic rays excluded),
while ``stars`` holds only the ``max_stars`` brightest, measured: enough for the statistics
and for registration, and what keeps a 26 MP frame to a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from subwatch.measure.background import (
    Background,
    Gradient,
    Pyramid,
    estimate_background,
    measure_gradient,
)
from subwatch.measure.stars import MAX_STARS, Detections, StarList, detect_stars

SNR_STARS = 25
#: The matched filter's FWHM (px) when nothing better is known.
FWHM_GUESS = 3.0
#: Measured FWHM / guess above which the frame is detected again at the measured scale.
RETRY_WIDER = 1.3


@dataclass
class FrameMeasurement:
    background: Background
    gradient: Gradient
    stars: StarList  # the measured stars (at most ``max_stars``), brightest first
    fwhm: float | None  # px, median over good stars (Moffat fits where there are enough)
    eccentricity: float | None
    snr: float | None
    hfr: float | None = None  # half-flux radius, px, median over the same stars as ``fwhm``
    detections: np.ndarray | None = None  # (n, 2) x, y of every detection, measured or not

    @property
    def saturated_fraction(self) -> float:
        """Share of the detections whose cores clipped (all of them are among the measured)."""
        return float(np.count_nonzero(self.stars.saturated)) / max(self.n_stars, 1)

    @property
    def n_stars(self) -> int:
        """Detections above threshold, hot pixels and cosmic rays excluded (see ``stars``)."""
        return len(self.stars) if self.detections is None else int(self.detections.shape[0])


def luminance(image: np.ndarray) -> np.ndarray:
    """A 2D view for measuring: colour frames are measured on the mean of their channels."""
    return image if image.ndim == 2 else image.mean(axis=2, dtype=np.float32)


def measure_frame(
    image: np.ndarray,
    *,
    saturation: float | None = None,
    fwhm_guess: float = FWHM_GUESS,
    threshold: float = 5.0,
    max_stars: int = MAX_STARS,
) -> FrameMeasurement:
    """Measure a calibrated frame (ADU). ``saturation`` is the level of clipped star cores."""
    lum = luminance(image)
    pyramid = Pyramid(lum, reuse=True)
    bkg = estimate_background(lum, pyramid=pyramid)

    def detect(guess: float) -> Detections:
        return detect_stars(
            lum,
            bkg,
            pyramid=pyramid,
            saturation=saturation,
            threshold=threshold,
            fwhm_guess=guess,
            max_stars=max_stars,
        )

    found = detect(fwhm_guess)
    fwhm = _median_fwhm(found.stars)
    if fwhm is not None and fwhm > RETRY_WIDER * fwhm_guess:
        # Stars clearly wider than the matched filter, local sky and stamps assumed (poor
        # seeing, defocus): faint ones were lost and the stamps cut their wings. Detect again
        # at their scale, which costs less than the first pass (a coarser binning).
        found = detect(fwhm)
        fwhm = _median_fwhm(found.stars)
    stars = found.stars
    return FrameMeasurement(
        background=bkg,
        gradient=measure_gradient(bkg, lum.shape),
        stars=stars,
        fwhm=fwhm,
        eccentricity=_median_of(stars, stars.eccentricity),
        snr=bright_star_snr(stars),
        hfr=_median_of(stars, stars.hfr),
        detections=found.xy,
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


def _median_of(stars: StarList, values: np.ndarray) -> float | None:
    """Median over the fitted stars when there are enough of them, else over the good ones."""
    fitted = stars.fitted & np.isfinite(values)
    sample = fitted if fitted.sum() >= 5 else _shape_sample(stars) & np.isfinite(values)
    return float(np.median(values[sample])) if sample.any() else None


def _median_fwhm(stars: StarList) -> float | None:
    return _median_of(stars, stars.fwhm)
