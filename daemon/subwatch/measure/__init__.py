"""Measuring a sub: background, noise, gradient, stars, FWHM, eccentricity, SNR; and judging it.

``background`` bins the frame once and models the sky and its noise on a clipped mesh,
``stars`` detects stars on the binned copy with a matched filter and measures the brightest
on full-resolution stamps (adaptive moments, a Moffat fit for FWHM and HFR), ``frame`` bundles
the per-sub numbers, and ``quality`` turns them into accept or reject-with-a-reason against
the running medians of the stack.
"""

from subwatch.measure.background import (
    Background,
    Gradient,
    Pyramid,
    estimate_background,
    measure_gradient,
)
from subwatch.measure.frame import FrameMeasurement, luminance, measure_frame
from subwatch.measure.stars import Detections, StarList, detect_stars

__all__ = [
    "Background",
    "Detections",
    "FrameMeasurement",
    "Gradient",
    "Pyramid",
    "StarList",
    "detect_stars",
    "estimate_background",
    "luminance",
    "measure_frame",
    "measure_gradient",
]
