"""Calibration: from raw bias, dark and flat frames to masters, and from a raw light to a clean one.

Read as a sequence, like the steps a careful imager does by hand: ``combine`` integrates raw
calibration frames into masters; ``library`` groups them by sensor settings and picks the right
masters for each light; ``apply`` subtracts bias and (scaled) dark, divides by the flat and
repairs hot pixels; ``debayer`` turns a colour sensor's mosaic into RGB, after calibration,
since masters live in the same mosaic space as the raw light. ``calibrate_light`` runs them.
"""

from __future__ import annotations

import numpy as np

from subwatch.calibration.apply import (
    correct_pixels,
    find_outlier_pixels,
    flat_correct,
    subtract_bias,
    subtract_dark,
)
from subwatch.calibration.debayer import debayer
from subwatch.calibration.library import CalibrationLibrary, Master, MasterSet


def calibrate_light(
    raw: np.ndarray,
    masters: MasterSet,
    *,
    exptime: float | None,
    bayer: str | None,
    cosmetic: bool = True,
) -> np.ndarray:
    """Calibrate a raw 2D light with what the library found; returns float32, RGB if ``bayer``."""
    img = raw.astype(np.float32, copy=True)
    if masters.dark is not None:
        if masters.dark_scale is not None and masters.bias is not None:
            img = subtract_dark(
                img,
                masters.dark.data,
                light_exptime=exptime,
                dark_exptime=masters.dark.key.exptime,
                bias=masters.bias.data,
            )
        else:
            img = subtract_dark(img, masters.dark.data)
    elif masters.bias is not None:
        img = subtract_bias(img, masters.bias.data)
    if masters.flat is not None:
        img = flat_correct(img, masters.flat.data)
    if cosmetic:
        cfa = bayer is not None
        if masters.dark is not None and masters.dark.hot_pixels is not None:
            pixels = masters.dark.hot_pixels
        else:
            pixels = find_outlier_pixels(img, cfa=cfa)
        img = correct_pixels(img, pixels, cfa=cfa)
    if bayer is not None:
        img = debayer(img, bayer)
    return img.astype(np.float32, copy=False)


__all__ = ["CalibrationLibrary", "Master", "MasterSet", "calibrate_light", "debayer"]
