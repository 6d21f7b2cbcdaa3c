"""Calibration: from raw bias, dark and flat frames to masters, and from a raw light to a clean one.

Read as a sequence, like the steps a careful imager does by hand: ``combine`` integrates raw
calibration frames into masters (a sigma-clipped mean); ``library`` groups them by sensor
settings, keeps the masters on disk and picks the right ones for each light; ``apply``
subtracts bias and (scaled) dark, divides by the flat and repairs hot, cold and dead pixels;
``debayer`` turns a colour sensor's mosaic into RGB, after calibration, since masters live in
the same mosaic space as the raw light. ``calibrate_light`` runs them in that order.
"""

from __future__ import annotations

import numpy as np

from subwatch.calibration.apply import (
    correct_pixels,
    find_dark_defects,
    find_dead_pixels,
    find_outlier_pixels,
    flat_correct,
    normalise_flat,
    subtract_and_flatten,
    subtract_bias,
    subtract_dark,
)
from subwatch.calibration.debayer import debayer
from subwatch.calibration.library import (
    CalibrationLibrary,
    GroupKey,
    Master,
    MasterSet,
    read_meta,
)


def _fits(master_data: np.ndarray, raw: np.ndarray) -> bool:
    return master_data.shape == raw.shape or (
        master_data.ndim == 2 and raw.ndim == 3 and master_data.shape == raw.shape[:2]
    )


def calibrate_light(
    raw: np.ndarray,
    masters: MasterSet,
    *,
    exptime: float | None = None,
    bayer: str | None = None,
    cosmetic: bool = True,
) -> np.ndarray:
    """Calibrate a raw light (ADU) with the masters ``match`` chose; float32, RGB if ``bayer``.

    Order: subtract bias and dark (scaled by ``masters.dark_scale``; ``exptime``, seconds, is
    the light's own and only informs that choice, made in ``match``), divide by the flat,
    repair defects (those of the master dark and flat, or the light's own isolated spikes when
    there is no dark), then debayer when ``bayer`` names the mosaic. A master whose size does
    not fit the raw frame is left out with a note rather than raising.
    """
    del exptime  # the scale was decided by match, with the tolerance of the configuration
    raw = np.asarray(raw)
    for kind in ("bias", "dark", "flat"):
        master = getattr(masters, kind)
        if master is not None and not _fits(master.data, raw):
            masters.notes.append(f"{kind} master refused: size {master.data.shape} != {raw.shape}")
            setattr(masters, kind, None)
    if masters.dark is not None and masters.dark_scale and masters.bias is None:
        masters.notes.append("dark not scaled: its bias was refused")
        masters.dark = None
        masters.dark_scale = None

    flat = masters.flat.data if masters.flat is not None else None
    img = subtract_and_flatten(raw, masters.subtrahend(), flat)
    if cosmetic:
        cfa = bayer is not None and img.ndim == 2
        found = []
        dark_defects = masters.dark.defects if masters.dark is not None else None
        if dark_defects is not None:
            found.append(dark_defects)
        else:
            found.append(find_outlier_pixels(img, cfa=cfa))
        if masters.flat is not None and masters.flat.defects is not None:
            found.append(masters.flat.defects)
        pixels = np.concatenate(found) if found else np.zeros((0, 2), np.intp)
        if len(pixels):
            correct_pixels(img, pixels, cfa=cfa, in_place=True)
    if bayer is not None and img.ndim == 2:
        img = debayer(img, bayer)
    return img


__all__ = [
    "CalibrationLibrary",
    "GroupKey",
    "Master",
    "MasterSet",
    "calibrate_light",
    "correct_pixels",
    "debayer",
    "find_dark_defects",
    "find_dead_pixels",
    "find_outlier_pixels",
    "flat_correct",
    "normalise_flat",
    "read_meta",
    "subtract_and_flatten",
    "subtract_bias",
    "subtract_dark",
]
