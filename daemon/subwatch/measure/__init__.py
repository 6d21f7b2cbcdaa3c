"""Measuring a sub: background, noise, gradient, stars, FWHM, eccentricity, SNR; and judging it.

``background`` models the sky on a clipped mesh, ``stars`` finds and measures stars with a
matched filter and adaptive moments, ``frame`` bundles the per-sub numbers, and ``quality``
turns them into accept or reject-with-a-reason against the running medians of the stack.
"""

from subwatch.measure.background import Background, Gradient, estimate_background, measure_gradient
from subwatch.measure.frame import FrameMeasurement, luminance, measure_frame
from subwatch.measure.stars import StarList, detect_stars

__all__ = [
    "Background",
    "FrameMeasurement",
    "Gradient",
    "StarList",
    "detect_stars",
    "estimate_background",
    "luminance",
    "measure_frame",
    "measure_gradient",
]
