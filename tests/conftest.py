"""Shared fixtures: the real frames beside the project (skipped when absent), star renderers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.skip("real frames (../shared/data/real) not present")
    return REAL


def render_gaussian_stars(
    shape: tuple[int, int],
    xy: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    *,
    background: float = 1000.0,
    seed: int = 0,
    noise: bool = True,
) -> np.ndarray:
    """A float32 image of Gaussian stars on a flat sky with Poisson noise (ADU = e-)."""
    h, w = shape
    sigma = fwhm / 2.3548
    img = np.full(shape, background, np.float64)
    r = int(np.ceil(4 * sigma)) + 1
    for (x, y), f in zip(xy, flux, strict=True):
        x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
        y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += (
            f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        )
    if noise:
        img = np.random.default_rng(seed).poisson(img)
    return img.astype(np.float32)
