"""2x3 affine matrices: applying, inverting, fitting and comparing them.

Convention used everywhere in ``subwatch.register``: a 2x3 matrix ``M`` maps pixel ``(x, y)`` of
a sub (0-based, ``x`` = column, ``y`` = row, pixel centres at integer coordinates) into the
reference (stack) pixel grid::

    [xr, yr] = M[:, :2] @ [x, y] + M[:, 2]

A *similarity* is the special case ``M[:, :2] = [[a, -b], [b, a]]`` (rotation by
``atan2(b, a)``, uniform scale ``hypot(a, b)``, no mirror); an *affine* matrix has all six
entries free. All coordinates and translations are in pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "apply_transform",
    "fit_affine",
    "fit_similarity",
    "invert_transform",
    "rotation_scale",
    "similarity_from_triplets",
    "transform_error",
]


def _as_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 3):
        m = m[:2]
    if m.shape != (2, 3):
        raise ValueError(f"expected a 2x3 (or 3x3) transform matrix, got shape {m.shape}")
    return m


def apply_transform(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` pixel positions ``(x, y)`` through ``matrix`` (sub -> reference).

    Extra columns (e.g. a flux column) are ignored; the result is always ``(N, 2)`` float64 px.
    """
    m = _as_matrix(matrix)
    p = np.asarray(xy, dtype=np.float64)
    if p.ndim == 1:
        p = p.reshape(1, -1)
    p = p[:, :2]
    return p @ m[:, :2].T + m[:, 2]


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """Return the 2x3 matrix of the inverse map (reference -> sub).

    Raises ``ValueError`` for a singular matrix, which no physical registration can produce.
    """
    m = _as_matrix(matrix)
    a = m[:, :2]
    det = float(np.linalg.det(a))
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise ValueError("transform matrix is singular and cannot be inverted")
    ai = np.linalg.inv(a)
    return np.hstack([ai, (-ai @ m[:, 2]).reshape(2, 1)])


def rotation_scale(matrix: np.ndarray) -> tuple[float, float]:
    """Rotation (degrees, counter-clockwise in x/y pixel axes, in (-180, 180]) and scale.

    For an affine matrix these are the rotation and scale of its closest similarity: rotation
    from the antisymmetric part, scale as ``sqrt(|det|)`` (the area ratio's square root).
    """
    m = _as_matrix(matrix)
    rot = float(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])))
    if rot <= -180.0:
        rot += 360.0
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    return rot, scale


def transform_error(m_fit: np.ndarray, m_true: np.ndarray, width: int, height: int) -> float:
    """RMS distance (px) between where two transforms put the pixels of a ``width x height`` sub.

    The sub is sampled on a regular 32x32 grid of pixel centres spanning ``[0, width-1] x
    [0, height-1]``; both matrices map the grid into the reference and the RMS of the 2D
    displacement is returned. This is the number that matters for stacking: how far, on
    average over the frame, a fitted transform misplaces light.
    """
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    gx = np.linspace(0.0, width - 1.0, 32)
    gy = np.linspace(0.0, height - 1.0, 32)
    xx, yy = np.meshgrid(gx, gy)
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    d = apply_transform(m_fit, grid) - apply_transform(m_true, grid)
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1))))


def fit_similarity(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Weighted least-squares similarity (rotation, uniform scale, translation) ``src -> dst``.

    Closed form: with centred coordinates the 4 parameters decouple, so no iteration is needed.
    Needs at least 2 distinct points; returns a 2x3 float64 matrix.
    """
    s = np.asarray(src, dtype=np.float64)[:, :2]
    d = np.asarray(dst, dtype=np.float64)[:, :2]
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    wsum = w.sum()
    if len(s) < 2 or wsum <= 0:
        raise ValueError("a similarity needs at least two weighted points")
    sc = (w @ s) / wsum
    dc = (w @ d) / wsum
    p = s - sc
    q = d - dc
    norm = float(w @ np.sum(p * p, axis=1))
    if norm <= 1e-12:
        raise ValueError("points are coincident; similarity undefined")
    a = float(w @ (p[:, 0] * q[:, 0] + p[:, 1] * q[:, 1])) / norm
    b = float(w @ (p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0])) / norm
    r = np.array([[a, -b], [b, a]])
    t = dc - r @ sc
    return np.hstack([r, t.reshape(2, 1)])


def fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares affine map ``src -> dst`` (6 parameters, needs >= 3 points).

    Solved on centred coordinates for numerical conditioning; returns a 2x3 float64 matrix.
    """
    s = np.asarray(src, dtype=np.float64)[:, :2]
    d = np.asarray(dst, dtype=np.float64)[:, :2]
    if len(s) < 3:
        raise ValueError("an affine transform needs at least three points")
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    wsum = w.sum()
    if wsum <= 0:
        raise ValueError("weights sum to zero")
    sc = (w @ s) / wsum
    dc = (w @ d) / wsum
    p = s - sc
    q = d - dc
    sw = np.sqrt(w)[:, None]
    sol, _, rank, _ = np.linalg.lstsq(p * sw, q * sw, rcond=None)
    if rank < 2:
        raise ValueError("points are collinear; affine transform undefined")
    a = sol.T
    t = dc - a @ sc
    return np.hstack([a, t.reshape(2, 1)])


def similarity_from_triplets(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarities for many small point sets at once.

    ``src`` and ``dst`` are ``(H, K, 2)`` (H hypotheses of K >= 2 corresponding points, e.g. the
    three vertices of matched triangles); returns ``(H, 2, 3)`` matrices. Degenerate sets give
    NaN matrices, which callers drop.
    """
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    sc = s.mean(axis=1, keepdims=True)
    dc = d.mean(axis=1, keepdims=True)
    p = s - sc
    q = d - dc
    norm = np.sum(p * p, axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.sum(p[..., 0] * q[..., 0] + p[..., 1] * q[..., 1], axis=1) / norm
        b = np.sum(p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0], axis=1) / norm
    out = np.empty((len(s), 2, 3))
    out[:, 0, 0] = a
    out[:, 0, 1] = -b
    out[:, 1, 0] = b
    out[:, 1, 1] = a
    scx = sc[:, 0, 0]
    scy = sc[:, 0, 1]
    out[:, 0, 2] = dc[:, 0, 0] - (a * scx - b * scy)
    out[:, 1, 2] = dc[:, 0, 1] - (b * scx + a * scy)
    return out
