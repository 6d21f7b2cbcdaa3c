"""Triangle asterisms and their rotation-, translation- and scale-invariant descriptors.

Why triangles: three stars fix a similarity transform, and the *shape* of the triangle they form
does not change when the frame is shifted, rotated (by any angle, 180 degrees included) or
rescaled. Describing each triangle by the ratios of its sorted side lengths therefore gives a
fingerprint that is identical in the sub and in the reference, whatever the pointing.

To keep the number of triangles linear in the number of stars (rather than cubic) and to make
them local (so that a partial overlap still leaves whole triangles in common), each triangle is
a star plus two of its ``k`` nearest neighbours. Very small lists use every triangle instead.

Descriptor of a triangle with sides ``s0 <= s1 <= s2`` (px): ``(s0/s2, s1/s2, orientation)``.
Vertices are stored in a canonical order (vertex ``i`` opposite side ``s_i``), so a descriptor
match also says which star corresponds to which. The orientation (sign of the signed area, after
canonical ordering) is scaled so that mirror-image triangles never match: a similarity or a
physical affine transform between two frames of the same camera preserves handedness.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Asterisms", "build_asterisms", "match_asterisms"]

#: Lists of at most this many stars use every triangle (C(12, 3) = 220).
ALL_TRIANGLES_MAX = 12
#: Triangles whose canonical vertex order is ambiguous (two sides within this fraction of the
#: longest side) are dropped: noise could swap their vertices between the two lists.
ORDER_GAP = 0.005
#: Triangles flatter than this (twice the area over the longest side squared) are dropped: their
#: orientation is not reliable.
MIN_FLATNESS = 0.03
#: Offset along the third descriptor axis separating the two orientations.
ORIENTATION_SEPARATION = 1.0


class Asterisms:
    """Triangles of one star list: vertex indices (T, 3) in canonical order, descriptors (T, 3)."""

    __slots__ = ("descriptors", "vertices")

    def __init__(self, vertices: np.ndarray, descriptors: np.ndarray) -> None:
        self.vertices = vertices
        self.descriptors = descriptors

    def __len__(self) -> int:
        return len(self.vertices)


def _candidate_triangles(xy: np.ndarray, k: int) -> np.ndarray:
    """Unique index triples (T, 3): each star with two of its ``k`` nearest neighbours."""
    n = len(xy)
    if n <= ALL_TRIANGLES_MAX:
        return np.array(list(combinations(range(n), 3)), dtype=np.intp).reshape(-1, 3)
    k_eff = min(k, n - 1)
    _, nn = cKDTree(xy).query(xy, k=k_eff + 1)
    nn = nn[:, 1:]  # drop the star itself
    pairs = np.array(list(combinations(range(k_eff), 2)), dtype=np.intp)
    tri = np.empty((n, len(pairs), 3), dtype=np.intp)
    tri[:, :, 0] = np.arange(n)[:, None]
    tri[:, :, 1] = nn[:, pairs[:, 0]]
    tri[:, :, 2] = nn[:, pairs[:, 1]]
    tri = np.sort(tri.reshape(-1, 3), axis=1)
    code = (tri[:, 0] * n + tri[:, 1]) * n + tri[:, 2]
    _, first = np.unique(code, return_index=True)
    return tri[first]


def build_asterisms(xy: np.ndarray, k: int = 6) -> Asterisms:
    """Build the triangles of a star list (``(N, 2)`` px, brightest first) and describe them."""
    pts = np.asarray(xy, dtype=np.float64)[:, :2]
    if len(pts) < 3:
        return Asterisms(np.empty((0, 3), dtype=np.intp), np.empty((0, 3)))
    tri = _candidate_triangles(pts, k)
    p = pts[tri]  # (T, 3, 2)
    # side opposite vertex v joins the two other vertices
    sides = np.stack(
        [
            np.hypot(*(p[:, 2] - p[:, 1]).T),
            np.hypot(*(p[:, 2] - p[:, 0]).T),
            np.hypot(*(p[:, 1] - p[:, 0]).T),
        ],
        axis=1,
    )
    order = np.argsort(sides, axis=1)
    sides = np.take_along_axis(sides, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    p = pts[tri]
    longest = sides[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        r0 = sides[:, 0] / longest
        r1 = sides[:, 1] / longest
        e1 = p[:, 1] - p[:, 0]
        e2 = p[:, 2] - p[:, 0]
        cross = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        flat = np.abs(cross) / (longest * longest)
    keep = (
        (longest > 0)
        & np.isfinite(flat)
        & (flat >= MIN_FLATNESS)
        & (r1 - r0 >= ORDER_GAP)
        & (1.0 - r1 >= ORDER_GAP)
    )
    desc = np.column_stack([r0, r1, np.sign(cross) * ORIENTATION_SEPARATION])[keep]
    return Asterisms(tri[keep], desc)


def match_asterisms(
    sub: Asterisms, ref: Asterisms, tolerance: float = 0.015, per_triangle: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Pair triangles whose descriptors agree within ``tolerance`` (dimensionless ratio units).

    Each sub triangle keeps up to ``per_triangle`` nearest reference triangles in descriptor
    space (a KD-tree query). Returns two ``(M, 3)`` arrays of star indices: row ``m`` says that
    sub stars ``sub_idx[m]`` correspond, vertex by vertex, to reference stars ``ref_idx[m]``.
    """
    empty = np.empty((0, 3), dtype=np.intp)
    if len(sub) == 0 or len(ref) == 0:
        return empty, empty
    kq = min(per_triangle, len(ref))
    dist, idx = cKDTree(ref.descriptors).query(
        sub.descriptors, k=kq, distance_upper_bound=tolerance
    )
    dist = dist.reshape(len(sub), kq)
    idx = idx.reshape(len(sub), kq)
    ok = np.isfinite(dist)
    rows, cols = np.nonzero(ok)
    return sub.vertices[rows], ref.vertices[idx[rows, cols]]
