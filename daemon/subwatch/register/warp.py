"""Resample a sub onto the reference grid, and say which output pixels it actually covers.

``matrix`` maps SOURCE (sub) pixel ``(x, y)`` to OUTPUT (reference) pixel coordinates, the same
convention as ``find_transform``; OpenCV's ``warpAffine`` without ``WARP_INVERSE_MAP`` takes its
matrix in exactly that sense and inverts it internally to sample the source.

Shapes: a 2D image ``(H, W)`` or a channel-last image ``(H, W, C)`` (e.g. debayered RGB). Channel-
first ``(C, H, W)`` data must be transposed by the caller (``np.moveaxis(img, 0, -1)``): the shape
alone cannot tell a 3-row image from three channels. Output is float32, outside the sub is 0.

Coverage: an array of ones warped with bilinear interpolation, in [0, 1]. 1 means the output
pixel is fully inside the sub; values in (0, ~0.999) mark the one-pixel rim that is partially
covered; 0 is outside. Lanczos (8x8 taps) also reads up to 3 px beyond the sub's edge, where the
border is 0, so the outermost ~3 covered pixels are slightly attenuated; a stacker that wants
edge-exact pixels should erode the coverage by a few px for ``lanczos`` (1 px for ``cubic``).

OpenCV quantises sub-pixel sample positions to 1/32 px in ``warpAffine``, i.e. at most
1/64 px (0.016 px) of positional error, well below seeing-limited star sizes. Lanczos and
cubic ringing can make values negative next to hot pixels; they are deliberately not clipped.
"""

from __future__ import annotations

import cv2
import numpy as np

from subwatch.register.transforms import _as_matrix

__all__ = ["INTERPOLATIONS", "warp_image"]

INTERPOLATIONS = {
    "lanczos": cv2.INTER_LANCZOS4,
    "cubic": cv2.INTER_CUBIC,
    "linear": cv2.INTER_LINEAR,
}

#: OpenCV's remap handles at most this many channels at once; more are warped in groups.
_CV_MAX_CHANNELS = 4


def _warp(img: np.ndarray, m: np.ndarray, size: tuple[int, int], flags: int) -> np.ndarray:
    out = cv2.warpAffine(img, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing singleton channel
        out = out[:, :, None]
    return out


def warp_image(
    image: np.ndarray,
    matrix: np.ndarray,
    out_shape: tuple[int, int],
    interpolation: str = "lanczos",
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``image`` (sub) into an output grid of ``out_shape = (height, width)`` px.

    Returns ``(warped, coverage)``: ``warped`` is float32 with the image's channel layout
    (``(h, w)`` or ``(h, w, C)``), ``coverage`` is float32 ``(h, w)`` in [0, 1], see module doc.
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
    if img.ndim == 2 or img.shape[2] <= _CV_MAX_CHANNELS:
        warped = _warp(img, m, size, flags)
    else:
        parts = [
            _warp(np.ascontiguousarray(img[:, :, c : c + _CV_MAX_CHANNELS]), m, size, flags)
            for c in range(0, img.shape[2], _CV_MAX_CHANNELS)
        ]
        warped = np.concatenate(parts, axis=2)
    ones = np.ones(img.shape[:2], dtype=np.float32)
    coverage = _warp(ones, m, size, cv2.INTER_LINEAR)
    coverage = np.clip(coverage, 0.0, 1.0)
    coverage[coverage > 1.0 - 1e-5] = 1.0
    return warped.astype(np.float32, copy=False), coverage.astype(np.float32, copy=False)
