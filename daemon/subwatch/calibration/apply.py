"""Calibration steps, each usable on its own, in the order a light goes through them.

``subtract_dark`` scales the dark current by exposure when the master dark's exposure differs
from the light's (the bias must then be known, since only the thermal part scales);
``flat_correct`` divides by a flat normalised to a median of one, so the light keeps its ADU
scale. ``correct_pixels`` replaces hot and cold pixels by the median of their same-colour
neighbours: on a colour sensor the neighbours one pixel away are of another colour, so they
are taken two pixels away.
"""

from __future__ import annotations

import cv2
import numpy as np


def subtract_bias(light: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return light - bias


def subtract_dark(
    light: np.ndarray,
    dark: np.ndarray,
    *,
    light_exptime: float | None = None,
    dark_exptime: float | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Remove bias and dark current; scale the thermal part when exposures differ."""
    if bias is None or not light_exptime or not dark_exptime or light_exptime == dark_exptime:
        return light - dark
    thermal = (dark - bias) * (light_exptime / dark_exptime)
    return light - bias - thermal


def normalise_flat(flat: np.ndarray) -> np.ndarray:
    """Scale a bias- or dark-flat-subtracted flat to a median of one; guard dead pixels."""
    h, w = flat.shape
    centre = flat[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    level = float(np.median(centre))
    if not np.isfinite(level) or level <= 0:
        raise ValueError("flat has no positive signal")
    norm = (flat / level).astype(np.float32)
    # A pixel at a few percent of the median is dead or a deep dust speck; dividing by it
    # would amplify noise a hundred-fold.
    np.maximum(norm, 0.05, out=norm)
    return norm


def flat_correct(light: np.ndarray, flat_norm: np.ndarray) -> np.ndarray:
    return light / flat_norm


def find_hot_pixels(dark_current: np.ndarray, sigma: float = 5.0) -> np.ndarray:
    """Pixels whose dark current stands ``sigma`` robust sigmas above the sensor's typical one."""
    sample = dark_current[::4, ::4]
    med = float(np.median(sample))
    mad = 1.4826 * float(np.median(np.abs(sample - med)))
    mad = max(mad, 1.0)
    return np.argwhere(dark_current > med + sigma * mad)


def find_outlier_pixels(image: np.ndarray, sigma: float = 8.0, cfa: bool = False) -> np.ndarray:
    """Without a dark: isolated pixels far above all their same-colour neighbours.

    A star's core is at most a few times brighter than the pixels next to it (optics spread
    light over several pixels); a hot pixel or a cosmic-ray hit stands alone. So a pixel is an
    outlier when it exceeds the local level (a 5x5 median) by ``sigma`` noise *and* by three
    times what its brightest neighbour does. On a colour sensor each of the four CFA planes is
    searched on its own, so neighbours are of the same colour.
    """
    if not cfa:
        return _outliers_mono(np.ascontiguousarray(image, dtype=np.float32), sigma)
    found = []
    for dy in (0, 1):
        for dx in (0, 1):
            plane = np.ascontiguousarray(image[dy::2, dx::2], dtype=np.float32)
            hits = _outliers_mono(plane, sigma)
            found.append(hits * 2 + [dy, dx])
    return np.concatenate(found) if found else np.zeros((0, 2), int)


_RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.uint8)


def _outliers_mono(plane: np.ndarray, sigma: float) -> np.ndarray:
    local = cv2.medianBlur(plane, 5)
    brightest = cv2.dilate(plane, _RING)
    excess = plane - local
    sample = excess[::4, ::4]
    mad = max(1.4826 * float(np.median(np.abs(sample - np.median(sample)))), 1e-3)
    hits = (excess > sigma * mad) & (excess > 3.0 * (brightest - local))
    return np.argwhere(hits)


def correct_pixels(image: np.ndarray, pixels: np.ndarray, cfa: bool = False) -> np.ndarray:
    """Replace the listed (row, col) pixels by the median of their same-colour neighbours."""
    if pixels.size == 0:
        return image
    out = image.copy()
    step = 2 if cfa else 1
    h, w = image.shape
    rows, cols = pixels[:, 0], pixels[:, 1]
    vals = []
    for dy in (-step, 0, step):
        for dx in (-step, 0, step):
            if (dy, dx) == (0, 0):
                continue
            rr = np.clip(rows + dy, 0, h - 1)
            cc = np.clip(cols + dx, 0, w - 1)
            vals.append(image[rr, cc])
    out[rows, cols] = np.median(np.stack(vals), axis=0)
    return out
