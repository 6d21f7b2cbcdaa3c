"""Resample a sub onto the reference grid, and say which output pixels it actually covers.

``matrix`` maps SOURCE (sub) pixel ``(x, y)`` to OUTPUT (reference) pixel coordinates, the same
convention as ``find_transform``; OpenCV's ``warpAffine`` without ``WARP_INVERSE_MAP`` takes its
matrix in exactly that sense and inverts it internally to sample the source.

Shapes: a 2D image ``(H, W)`` or a channel-last image ``(H, W, C)`` (e.g. debayered RGB). Channel-
first ``(C, H, W)`` data must be transposed by the caller (``np.moveaxis(img, 0, -1)``): the shape
alone cannot tell a 3-row image from three channels. Output is float32, outside the sub is 0.

Coverage: a boolean map of the output pixels whose whole interpolation kernel falls inside the
sub (the kernel reaches 4 px for ``lanczos``, 2 px for ``cubic``, 0 for ``linear``). Lanczos and
cubic read past the sub's edge, where the border is 0, so the pixels just inside it are biased
(on a flat image the first one by -5 % to +13 %); they are left out, and so is everything the
sub does not reach at all.

Cubic warps by a transform near a quarter turn of the identity (every sub of a night,
meridian flips included) go through ``cubic.py``: the same kernel in two compiled
one-dimensional passes, two to three times quicker than OpenCV's for a mono sub, about 1.5
times for colour (one channel at a time; docs/decisions.md). Other transforms and the other
interpolators use OpenCV.

OpenCV quantises sub-pixel sample positions to 1/32 px in ``warpAffine``, i.e. at most
1/64 px (0.016 px) of positional error, well below seeing-limited star sizes. Lanczos and
cubic ringing can make values negative next to hot pixels; they are deliberately not clipped.
"""

from __future__ import annotations

import cv2
import numba
import numpy as np

from subwatch.register.cubic import two_pass_plan, warp_cubic_two_pass
from subwatch.register.transforms import _as_matrix

__all__ = ["INTERPOLATIONS", "warp_image"]

INTERPOLATIONS = {
    "lanczos": cv2.INTER_LANCZOS4,
    "cubic": cv2.INTER_CUBIC,
    "linear": cv2.INTER_LINEAR,
}

#: How far past a pixel each interpolator reads, px: the rim of coverage it cannot compute.
_KERNEL_REACH = {"lanczos": 4, "cubic": 2, "linear": 0}

#: OpenCV's remap handles at most this many channels at once; more are warped in groups.
_CV_MAX_CHANNELS = 4


def _warp(img: np.ndarray, m: np.ndarray, size: tuple[int, int], flags: int) -> np.ndarray:
    out = cv2.warpAffine(img, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing singleton channel
        out = out[:, :, None]
    return out


def _coverage(
    src_shape: tuple[int, int], m: np.ndarray, out_shape: tuple[int, int], reach: int
) -> np.ndarray:
    """Output pixels whose whole interpolation kernel lies inside the sub.

    An output pixel samples the sub at ``m^-1 (u, v)``; the kernel reads ``reach`` px either
    side, so the sample must fall in ``[reach, W - 1 - reach] x [reach, H - 1 - reach]``. Along
    an output row the sample moves linearly, so each of the four bounds cuts the row at one
    point and the covered pixels of a row are one interval: the mask is filled row by row from
    the intervals, exactly, in a few milliseconds (warping an image of ones and eroding it took
    over a second at 26 MP).
    """
    h, w = out_shape
    sh, sw = src_shape
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    v = np.arange(h, dtype=np.float64)
    lo = np.full(h, 0.0)
    hi = np.full(h, float(w - 1))
    for (a, b, c), size in ((inv[0], sw), (inv[1], sh)):
        # sample = a * u + (b * v + c) must lie in [reach, size - 1 - reach]
        base = b * v + c
        lo_s, hi_s = float(reach), float(size - 1 - reach)
        if abs(a) < 1e-12:
            inside = (base >= lo_s - 1e-9) & (base <= hi_s + 1e-9)
            hi = np.where(inside, hi, -1.0)
            continue
        u1, u2 = (lo_s - base) / a, (hi_s - base) / a
        lo = np.maximum(lo, np.minimum(u1, u2))
        hi = np.minimum(hi, np.maximum(u1, u2))
    first = np.clip(np.ceil(lo - 1e-9), 0, w).astype(np.int64)
    last = np.clip(np.floor(hi + 1e-9), -1, w - 1).astype(np.int64)
    return _fill_rows(first, last, w)


@numba.njit(cache=True, nogil=True)
def _fill_rows(first: np.ndarray, last: np.ndarray, width: int) -> np.ndarray:
    """A boolean mask True from ``first[r]`` to ``last[r]`` (inclusive) in each row ``r``
    (compiled: a Python loop over 4176 rows took 20-40 ms, the mask's writing 2 ms)."""
    mask = np.zeros((first.size, width), dtype=np.bool_)
    for r in range(first.size):
        mask[r, first[r] : last[r] + 1] = True
    return mask


def warp_image(
    image: np.ndarray,
    matrix: np.ndarray,
    out_shape: tuple[int, int],
    interpolation: str = "lanczos",
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (sub) into an output grid of ``out_shape = (height, width)`` px.

    Returns ``(warped, coverage)``: ``warped`` is float32 with the image's channel layout
    (``(h, w)`` or ``(h, w, C)``), ``coverage`` is boolean ``(h, w)``, see module doc.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}"
        )
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {img.shape}")
    h, w = (int(out_shape[0]), int(out_shape[1]))
    if h < 1 or w < 1:
        raise ValueError(f"out_shape must be positive, got {out_shape}")
    m = _as_matrix(matrix)
    if not np.all(np.isfinite(m)):
        raise ValueError("transform matrix is not finite")
    img = np.ascontiguousarray(img, dtype=np.float32)
    size = (w, h)
    flags = INTERPOLATIONS[interpolation]
    plan = two_pass_plan(m, img.shape[:2]) if interpolation == "cubic" else None
    if plan is not None and img.ndim == 2:
        warped = warp_cubic_two_pass(img, plan, (h, w))
    elif plan is not None:  # channel by channel (26 MP RGB: 0.32-0.50 s against 0.55-0.71)
        warped = np.empty((h, w, img.shape[2]), dtype=np.float32)
        for c in range(img.shape[2]):
            warped[:, :, c] = warp_cubic_two_pass(img[:, :, c], plan, (h, w))
    elif img.ndim == 2 or img.shape[2] <= _CV_MAX_CHANNELS:
        warped = _warp(img, m, size, flags)
    else:
        parts = [
            _warp(np.ascontiguousarray(img[:, :, c : c + _CV_MAX_CHANNELS]), m, size, flags)
            for c in range(0, img.shape[2], _CV_MAX_CHANNELS)
        ]
        warped = np.concatenate(parts, axis=2)
    coverage = _coverage(img.shape[:2], m, (h, w), _KERNEL_REACH[interpolation])
    return warped.astype(np.float32, copy=False), coverage
