"""Stand-ins for the preview tests: render functions for the preview process, stack images.

The render factories live in a module of their own, with nothing heavy to import, because a
spawned preview process imports the module of the factory it is given.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from subwatch.enhance.previews import PreviewRequest


def describe_factory():
    """Reports what the process received; n_frames 13 raises, 66 kills the process."""

    def render(request: PreviewRequest) -> dict[str, Any]:
        image = request.snapshot.image
        if request.snapshot.n_frames == 13:
            raise ValueError("unlucky stack")
        if request.snapshot.n_frames == 66:
            os._exit(3)  # a crash of the process itself (a segfault, the OOM killer)
        return {
            "pid": os.getpid(),
            "nice": os.nice(0),
            "shape": list(image.shape),
            "sum": float(np.nansum(image, dtype=np.float64)),
            "nan": int(np.isnan(image).sum()),
        }

    return render


def sleepy_factory():
    """Never finishes on its own (a preview of a huge stack on a slow machine)."""

    def render(request: PreviewRequest) -> dict[str, Any]:
        time.sleep(600)
        return {}

    return render


def moffat_stack(
    shape: tuple[int, int],
    *,
    stars: int = 150,
    fwhm: float = 3.2,
    beta: float = 3.0,
    sky: float = 800.0,
    tilt: float = 0.15,
    noise: float = 6.0,
    seed: int = 0,
) -> np.ndarray:
    """A stack-like linear image: Moffat stars (as seeing makes them) on a sky that brightens
    by ``tilt`` of its level across the frame, with the Gaussian noise of averaged subs."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = sky * (1.0 + tilt * xx / w) + rng.normal(0.0, noise, shape)
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (np.pi * alpha**2)
    r = int(6 * fwhm)
    xs, ys = rng.uniform(8, w - 8, stars), rng.uniform(8, h - 8, stars)
    for x, y, flux in zip(xs, ys, 10 ** rng.uniform(3, 5, stars), strict=True):
        x0, x1, y0, y1 = (
            max(0, int(x) - r),
            min(w, int(x) + r + 1),
            max(0, int(y) - r),
            min(h, int(y) + r + 1),
        )
        d2 = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2
        image[y0:y1, x0:x1] += flux * norm * (1.0 + d2 / alpha**2) ** -beta
    return image.astype(np.float32)
