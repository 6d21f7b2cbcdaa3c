"""Bicubic resampling of one channel in two one-dimensional passes, compiled and vectorised.

OpenCV's bicubic ``warpAffine`` reads sixteen source pixels per output pixel through a table of
weights, one pixel at a time; at 26 MP it was the largest single cost of the per-frame chain
(0.2-0.45 s on this 2-core machine, docs/decisions.md). Between the subs of one night the
transform is nearly the identity (dithers of a few tens of pixels, field rotation of a
fraction of a degree, a meridian flip that is a half turn), and for such a transform the 2D
interpolation can be done as a row pass and a column pass (the classic two-pass
decomposition of an affine map):

* the row pass resamples every source row at ``x = alpha u + beta y + gamma``, giving an
  intermediate image ``T[y, u]`` on the output's columns;
* the column pass resamples every output column of ``T`` at ``y = d u + e v + f``.

``(x, y) = (a u + b v + c, d u + e v + f)`` is the inverse map, from output to source;
``alpha = a - b d / e``, ``beta = b / e``, ``gamma = c - b f / e``. Along a row of either pass
the sample moves by a nearly constant step, so long runs of output pixels read the same
source offset with weights that drift slowly: each run is one straight loop over contiguous
memory (four loads, four weights computed from the fraction, four products) that the
compiler turns into vector instructions. Each pass also costs one write and one read of a
frame-sized array, so the warp is bound by memory bandwidth rather than by arithmetic.

The kernel is Keys' cubic with ``a = -0.75``, the one OpenCV uses, applied along the two
axes of the sheared frame; for the small rotations it is used for, the result equals
OpenCV's to a small fraction of the noise (OpenCV also rounds sample positions to 1/32 px,
which this does not). Taps outside the sub read zero, as with OpenCV's constant border; the
coverage map (``warp.py``) leaves those pixels out of the stack anyway.

A transform far from the identity (a rotation of more than ``MAX_RESIDUAL_TURN`` after the
nearest quarter turn is taken out exactly, a mirror, a scale change beyond
``MAX_SCALE_CHANGE``) is not handled here: the row pass would squeeze the image by
``1 / cos(angle)`` and lose detail. ``two_pass_plan`` says so and the caller uses OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numba
import numpy as np

from subwatch.compiled import LAUNCH_LOCK

__all__ = ["KEYS_A", "TwoPassPlan", "two_pass_plan", "warp_cubic_two_pass"]

#: Largest rotation (radians) left after the nearest quarter turn is taken out: 5 degrees.
#: The row pass then squeezes by at most 1 / cos(5 deg) = 1.004.
MAX_RESIDUAL_TURN = np.deg2rad(5.0)

#: Largest relative scale change handled (registration allows 5 % between subs).
MAX_SCALE_CHANGE = 0.10

#: Longest run of output pixels computed with one source offset: keeps the float32 sample
#: position exact to ~1e-4 px along the run.
_RUN = 1024

#: Keys' parameter: -0.75 is OpenCV's, so the two paths give the same stack; -0.5 (Catmull-Rom)
#: keeps centroids exactly but widens stars more (docs/decisions.md).
KEYS_A = -0.75

#: cv2.rotate codes for 1, 2 and 3 quarter turns counter-clockwise (in image coordinates,
#: y down, the way ``numpy.rot90`` turns an array).
_ROTATE = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


@numba.njit(cache=True, nogil=True, inline="always", fastmath=True)
def _weights(t: np.float32, a: np.float32) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """Keys' cubic weights of the taps at -1, 0, +1, +2 for a fraction ``t`` in [0, 1)."""
    one = np.float32(1.0)
    t1 = t + one
    t2 = one - t
    t3 = np.float32(2.0) - t
    w0 = ((a * t1 - np.float32(5.0) * a) * t1 + np.float32(8.0) * a) * t1 - np.float32(4.0) * a
    w1 = ((a + np.float32(2.0)) * t - (a + np.float32(3.0))) * t * t + one
    w2 = ((a + np.float32(2.0)) * t2 - (a + np.float32(3.0))) * t2 * t2 + one
    w3 = ((a * t3 - np.float32(5.0) * a) * t3 + np.float32(8.0) * a) * t3 - np.float32(4.0) * a
    return w0, w1, w2, w3


@numba.njit(cache=True, nogil=True)
def _edge_sample(line: np.ndarray, pos: float, a: np.float32) -> np.float32:
    """One cubic sample of a 1D ``line`` near or past its ends (missing taps read 0)."""
    n = line.shape[0]
    i = int(np.floor(pos))
    acc = np.float32(0.0)
    if i < -2 or i > n:
        return acc
    w = _weights(np.float32(pos - i), a)
    for k in range(4):
        j = i - 1 + k
        if 0 <= j < n:
            acc += w[k] * line[j]
    return acc


@numba.njit(cache=True, nogil=True, inline="always", fastmath=True)
def _run(
    out: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
    r2: np.ndarray,
    r3: np.ndarray,
    t0: np.float32,
    step: np.float32,
    a: np.float32,
) -> None:
    """One run of output pixels: ``out[q]`` from the taps ``r0[q] .. r3[q]`` at the fraction
    ``t0 + step q``; one straight loop over contiguous memory, which vectorises."""
    for q in range(out.size):
        w0, w1, w2, w3 = _weights(t0 + step * np.float32(q), a)
        out[q] = w0 * r0[q] + w1 * r1[q] + w2 * r2[q] + w3 * r3[q]


@numba.njit(cache=True, nogil=True, inline="always")
def _run_end(u: int, n_out: int, slope: float, p0: float, drift: int, lo: int, hi: int) -> int:
    """End of the run of output pixels from ``u`` that read the same taps, shifted by ``drift``
    per pixel: ``floor(slope * u' + p0) - drift * u'`` stays what it is at ``u`` and within
    ``[lo, hi]`` (both are monotone in ``u'``, so checking the run's last pixel suffices)."""
    first = int(np.floor(slope * u + p0)) - drift * u
    end = min(n_out, u + _RUN)
    while end > u + 1:
        i = int(np.floor(slope * (end - 1) + p0))
        if i - drift * (end - 1) == first and lo <= i <= hi:
            break
        end = u + (end - u) // 2
    return end


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _row_pass(
    src: np.ndarray, alpha: float, beta: float, gamma: float, a: np.float32, out: np.ndarray
) -> None:
    """``out[y, u]`` = row ``y`` of ``src`` sampled at ``x = alpha u + beta y + gamma``."""
    height, width = src.shape
    n_out = out.shape[1]
    step = np.float32(alpha - 1.0)
    for y in numba.prange(height):
        row = src[y]
        dst = out[y]
        x0 = beta * y + gamma
        u = 0
        while u < n_out:
            i = int(np.floor(alpha * u + x0))
            if i < 1 or i > width - 3:
                dst[u] = _edge_sample(row, alpha * u + x0, a)
                u += 1
                continue
            # x = u + (i - u) + fraction: the source offset i - u holds along the run
            end = _run_end(u, n_out, alpha, x0, 1, 1, width - 3)
            t0 = np.float32(alpha * u + x0 - i)
            lo = i - 1  # the four taps of pixel u + q are row[lo + q .. lo + q + 3]
            n = end - u
            _run(
                dst[u:end],
                row[lo : lo + n],
                row[lo + 1 : lo + n + 1],
                row[lo + 2 : lo + n + 2],
                row[lo + 3 : lo + n + 3],
                t0,
                step,
                a,
            )
            u = end


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _column_pass(
    img: np.ndarray, d: float, e: float, f: float, a: np.float32, out: np.ndarray
) -> None:
    """``out[v, u]`` = column ``u`` of ``img`` sampled at ``y = d u + e v + f``."""
    height = img.shape[0]
    n_rows, n_out = out.shape
    step = np.float32(d)
    for v in numba.prange(n_rows):
        dst = out[v]
        y0 = e * v + f
        u = 0
        while u < n_out:
            i = int(np.floor(d * u + y0))
            if i < 1 or i > height - 3:
                dst[u] = _edge_sample(img[:, u], d * u + y0, a)
                u += 1
                continue
            end = _run_end(u, n_out, d, y0, 0, 1, height - 3)  # the same four rows
            t0 = np.float32(d * u + y0 - i)
            _run(
                dst[u:end],
                img[i - 1, u:end],
                img[i, u:end],
                img[i + 1, u:end],
                img[i + 2, u:end],
                t0,
                step,
                a,
            )
            u = end


@dataclass(frozen=True)
class TwoPassPlan:
    """How to warp with the two passes: turn the sub by ``quarter_turns`` first (exactly,
    ``numpy.rot90`` sense), then resample with ``inverse`` (output pixel -> turned sub)."""

    quarter_turns: int
    inverse: np.ndarray


def _turn_matrix(turns: int, shape: tuple[int, int]) -> np.ndarray:
    """3x3 map from a pixel of an ``(H, W)`` image to the same pixel after ``np.rot90(img,
    turns)`` (counter-clockwise on screen)."""
    h, w = shape
    turns %= 4
    if turns == 0:
        return np.eye(3)
    if turns == 1:  # (x, y) -> (y, W - 1 - x)
        return np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0], [0.0, 0.0, 1.0]])
    if turns == 2:  # (x, y) -> (W - 1 - x, H - 1 - y)
        return np.array([[-1.0, 0.0, w - 1.0], [0.0, -1.0, h - 1.0], [0.0, 0.0, 1.0]])
    # (x, y) -> (H - 1 - y, x)
    return np.array([[0.0, -1.0, h - 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def two_pass_plan(matrix: np.ndarray, src_shape: tuple[int, int]) -> TwoPassPlan | None:
    """The plan for ``matrix`` (2x3, sub pixel -> output pixel), or None when the transform is
    too far from a quarter turn of the identity for the two passes (see the module doc)."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    lin = full[:2, :2]
    det = float(np.linalg.det(lin))
    if not np.isfinite(det) or det <= 0.0:  # degenerate or mirrored
        return None
    scale = np.sqrt(det)
    if abs(scale - 1.0) > MAX_SCALE_CHANGE:
        return None
    angle = float(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))  # the rotation part
    # One np.rot90 turn of the sub is a rotation by -90 deg in pixel coordinates, so the
    # residual of ``angle`` after ``turns`` of them is angle + turns * 90 deg.
    turns = int(np.round(-angle / (np.pi / 2))) % 4
    turn = _turn_matrix(turns, src_shape)
    residual = full @ np.linalg.inv(turn)  # turned sub -> output
    lin_r = residual[:2, :2]
    if abs(np.arctan2(lin_r[1, 0] - lin_r[0, 1], lin_r[0, 0] + lin_r[1, 1])) > MAX_RESIDUAL_TURN:
        return None
    if np.max(np.abs(lin_r - np.eye(2) * scale)) > scale * (MAX_RESIDUAL_TURN + 0.05):
        return None  # shear (an affine fit) or an anisotropic scale beyond a small one
    return TwoPassPlan(turns, np.linalg.inv(residual)[:2])


def warp_cubic_two_pass(
    image: np.ndarray, plan: TwoPassPlan, out_shape: tuple[int, int], keys_a: float = KEYS_A
) -> np.ndarray:
    """Warp a 2D float32 ``image`` to ``out_shape`` with ``plan`` (from ``two_pass_plan``)."""
    src = np.ascontiguousarray(image, dtype=np.float32)
    if plan.quarter_turns:
        src = cv2.rotate(src, _ROTATE[plan.quarter_turns])
    (a, b, c), (d, e, f) = plan.inverse
    h, w = int(out_shape[0]), int(out_shape[1])
    middle = np.empty((src.shape[0], w), dtype=np.float32)
    out = np.empty((h, w), dtype=np.float32)
    with LAUNCH_LOCK:
        k = np.float32(keys_a)
        _row_pass(src, float(a - b * d / e), float(b / e), float(c - b * f / e), k, middle)
        _column_pass(middle, float(d), float(e), float(f), k, out)
    return out
