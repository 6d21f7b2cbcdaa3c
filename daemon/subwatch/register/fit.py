"""From matched asterisms to one checked transform: hypotheses, robust choice, refinement.

1. Every pair of matched triangles proposes a similarity (three vertex correspondences, solved
   in closed form). Each proposed star correspondence also collects one vote per triangle pair
   that contains it, so a hypothesis whose three correspondences are each backed by many
   triangles is tried first.
2. RANSAC-style consensus: the best-supported hypotheses (one per group of near-identical
   ones), plus a seeded random sample of the rest, map the sub's bright stars into the
   reference; a hypothesis scores the number of distinct reference stars it lands within
   ``1.5 * match_radius`` px of.
3. The best distinct hypotheses are refined, until three distinct answers are found (a
   hypothesis whose own triangle an answer already explains is skipped): match ALL stars by
   mutual nearest neighbour within ``match_radius`` px, least-squares fit on every pair
   (similarity first, then the affine model if asked), clip residual outliers, re-match, until
   the pairs stop changing.
4. Hot pixels sit at identical coordinates in both lists and so vote for the identity. A
   dither smaller than (or near) the match radius lets refinement pair them along with the
   stars, and the fit would land in between. If the pairs better explained by the identity are
   clearly (4 sigma) inconsistent with the transform fitted without them, they are a fixed
   pattern: those sub points are excluded and the refinement is run again.
5. Among the refined candidates the winner explains the most flux-weighted pairs (weights
   ``log(1 + flux / median)``), or without fluxes the most pairs among the bright stars used
   for asterisms; then most pairs; then lowest RMS. Supplying fluxes keeps faint point-like
   defects from outvoting real stars even when they are more numerous.
6. The winner is checked: too few inliers, an RMS residual of the brighter half of the pairs
   above ``max_rms`` (faint stars' centroid noise says nothing about the transform), or no more
   pairs than chance coincidences would give, raise ``RegistrationError``. A transform is
   never returned silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from subwatch.register.asterisms import build_asterisms, match_asterisms
from subwatch.register.transforms import (
    apply_transform,
    fit_affine,
    fit_similarity,
    rotation_scale,
    similarity_from_triplets,
)

__all__ = ["MODELS", "Registration", "RegistrationError", "find_transform"]

MODELS = ("similarity", "affine")

#: Nearest neighbours per star when building triangles (15 triangles per star for k = 6).
K_NEIGHBOURS = 6
#: Descriptor tolerance (dimensionless side ratios) for two triangles to be called the same.
DESCRIPTOR_TOLERANCE = 0.015
#: Plausible scale range of a hypothesis; a live stack from one camera changes by a few percent.
SCALE_RANGE = (0.5, 2.0)
#: Hypotheses evaluated first (best vote support, one per group of near-identical ones), then
#: a seeded random sample of the rest.
N_TOP_HYPOTHESES = 40
N_RANDOM_HYPOTHESES = 20
#: Upper bound on hypotheses evaluated when the first round finds no convincing consensus.
MAX_HYPOTHESES = 3000
#: Distinct refined answers compared in the end, and the most hypotheses refined to find them.
N_CANDIDATES = 3
MAX_REFINEMENTS = 8
#: Runners-up are refined only if they reach this fraction of the leader's consensus count.
RUNNER_UP_FRACTION = 0.25
#: Refinement iterations per model stage.
MAX_ITERATIONS = 20
#: Residual clipping: pairs beyond CLIP_SIGMA Gaussian sigmas (estimated robustly from the
#: median radial residual, corrected for the parameters the fit absorbed) are dropped, but never
#: those closer than CLIP_FLOOR px; at most CLIP_ROUNDS rounds per fit.
CLIP_SIGMA = 5.0
CLIP_FLOOR = 0.25
CLIP_ROUNDS = 5
#: Median of a Rayleigh distribution in units of its per-axis sigma.
_RAYLEIGH_MEDIAN = float(np.sqrt(2.0 * np.log(2.0)))
#: Minimum number of pairs a model needs to be determined.
_MIN_POINTS = {"similarity": 2, "affine": 3}
_N_PARAMS = {"similarity": 4, "affine": 6}


class RegistrationError(Exception):
    """A sub could not be registered trustworthily; the caller reports ``registration failed``.

    ``inliers`` is the number of star pairs the best attempt explained (0 when it never got that
    far) and ``rms`` its residual RMS in px (``None`` when no fit was made).
    """

    def __init__(self, message: str, inliers: int = 0, rms: float | None = None) -> None:
        super().__init__(message)
        self.inliers = int(inliers)
        self.rms = None if rms is None else float(rms)


@dataclass(frozen=True, eq=False)
class Registration:
    """A checked sub -> reference transform.

    ``matrix`` is 2x3 float64 (read-only) mapping sub pixel ``(x, y)`` into the reference grid;
    ``inliers`` the star pairs used in the final least-squares fit; ``rms`` the radial RMS of
    their residuals in px, ``bright_rms`` the same over the brighter half of them (what
    ``max_rms`` is checked against); ``rotation_deg`` (counter-clockwise in pixel axes,
    (-180, 180]) and ``scale`` (reference px per sub px) are derived from ``matrix``.
    """

    matrix: np.ndarray
    inliers: int
    rms: float
    bright_rms: float
    rotation_deg: float
    scale: float


@dataclass
class _Candidate:
    matrix: np.ndarray
    sub_idx: np.ndarray
    ref_idx: np.ndarray
    residuals: np.ndarray

    @property
    def inliers(self) -> int:
        return len(self.sub_idx)

    @property
    def rms(self) -> float:
        return float(np.sqrt(np.mean(self.residuals**2))) if len(self.residuals) else np.inf

    @property
    def bright_rms(self) -> float:
        """RMS over the brighter half of the pairs (at least 6): the fit's quality, not noise.

        Faint stars' centroids scatter by tenths of a pixel on real short subs (seeing jitter,
        low SNR), so the all-star RMS says more about the stars than about the transform; a
        wrong transform is off for the bright stars too. Sub indices run brightest first.
        """
        if not len(self.residuals):
            return np.inf
        order = np.argsort(self.sub_idx, kind="stable")
        n = max(6, len(order) // 2)
        return float(np.sqrt(np.mean(self.residuals[order[:n]] ** 2)))


def _prepare(
    stars: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Validate a star list; return positions (N, 2) brightest first, fluxes and positional
    uncertainties (each None when the list does not carry it)."""
    a = np.asarray(stars, dtype=np.float64)
    if a.size == 0:
        return np.empty((0, 2)), None, None
    if a.ndim != 2 or a.shape[1] not in (2, 3, 4):
        raise ValueError(
            f"{what} must be an (N, 2) x,y, (N, 3) x,y,flux or (N, 4) x,y,flux,sigma array, "
            f"got {a.shape}"
        )
    a = a[np.all(np.isfinite(a[:, :2]), axis=1)]
    if a.shape[1] == 2:
        return a.copy(), None, None
    flux = np.where(np.isfinite(a[:, 2]), a[:, 2], -np.inf)
    order = np.argsort(-flux, kind="stable")
    sigma = a[order, 3].copy() if a.shape[1] == 4 else None
    return a[order, :2].copy(), a[order, 2].copy(), sigma


def _score_hypotheses(
    mats: np.ndarray, sub: np.ndarray, ref_tree: cKDTree, n_ref: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct reference stars hit within ``radius`` px by each hypothesis, and a tie-breaker.

    Returns ``(counts, cost)``: cost is the mean squared distance of the hits (lower is better).
    """
    proj = np.matmul(sub[None, :, :], mats[:, :, :2].transpose(0, 2, 1)) + mats[:, None, :, 2]
    h, n = proj.shape[:2]
    dist, idx = ref_tree.query(proj.reshape(-1, 2), distance_upper_bound=radius)
    dist = dist.reshape(h, n)
    idx = idx.reshape(h, n)
    hit = idx < n_ref
    tagged = np.sort(np.where(hit, idx, -1), axis=1)
    distinct = (tagged[:, 1:] != tagged[:, :-1]) & (tagged[:, 1:] >= 0)
    counts = distinct.sum(axis=1) + (tagged[:, 0] >= 0)
    d2 = np.where(hit, dist, 0.0) ** 2
    cost = d2.sum(axis=1) / np.maximum(hit.sum(axis=1), 1)
    return counts, cost


def _mutual_matches(
    matrix: np.ndarray,
    sub: np.ndarray,
    ref: np.ndarray,
    ref_tree: cKDTree,
    radius: float,
    excluded: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (sub index, ref index) that are each other's nearest neighbour within ``radius``.

    Sub points flagged in ``excluded`` (a boolean mask) take no part at all.
    """
    allowed = np.arange(len(sub)) if excluded is None else np.nonzero(~excluded)[0]
    if len(allowed) == 0:
        return allowed, allowed
    proj = apply_transform(matrix, sub[allowed])
    dist, j = ref_tree.query(proj, distance_upper_bound=radius)
    k = np.nonzero(np.isfinite(dist))[0]
    j = j[k]
    if len(k) == 0:
        return k, j
    _, back = cKDTree(proj).query(ref[j])
    mutual = back == k
    return allowed[k[mutual]], j[mutual]


def _fit(model: str, src: np.ndarray, dst: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    return fit_similarity(src, dst, w) if model == "similarity" else fit_affine(src, dst, w)


def _robust_fit(
    model: str, src: np.ndarray, dst: np.ndarray, w: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit with iterated clipping of residual outliers. Returns (M, keep).

    The scale is estimated from the median radial residual of the kept pairs (Rayleigh
    statistics, corrected for the parameters the fit absorbs); pairs beyond ``CLIP_SIGMA`` of
    it, and beyond ``CLIP_FLOOR`` px, are dropped and the fit repeated until nothing changes.
    """
    keep = np.ones(len(src), dtype=bool)
    m = _fit(model, src, dst, w)
    min_points = max(_MIN_POINTS[model], 3)
    for _ in range(CLIP_ROUNDS):
        r = np.hypot(*(apply_transform(m, src) - dst).T)
        n = int(keep.sum())
        dof = max(2 * n - _N_PARAMS[model], 1)
        sigma = float(np.median(r[keep])) / _RAYLEIGH_MEDIAN * np.sqrt(2 * n / dof)
        new_keep = r <= max(CLIP_SIGMA * sigma, CLIP_FLOOR)
        if new_keep.sum() < min_points or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        m = _fit(model, src[keep], dst[keep], None if w is None else w[keep])
    return m, keep


def _refine(
    matrix: np.ndarray,
    sub: np.ndarray,
    ref: np.ndarray,
    ref_tree: cKDTree,
    model: str,
    radius: float,
    pair_weights: _PairWeights | _SigmaWeights | None,
    excluded: np.ndarray | None = None,
) -> _Candidate | None:
    """Iterate match-all-stars / least-squares until the pair set is stable.

    The affine model is reached through a similarity stage first: a 6-parameter fit on the few
    pairs an initial 3-star hypothesis finds could extrapolate wildly across the frame. Sub
    points flagged in ``excluded`` (known sensor defects) are never matched.
    """
    stages = ("similarity",) if model == "similarity" else ("similarity", "affine")
    m = matrix
    best: _Candidate | None = None
    for stage in stages:
        previous: tuple[bytes, bytes] | None = None
        for _ in range(MAX_ITERATIONS):
            i, j = _mutual_matches(m, sub, ref, ref_tree, radius, excluded)
            if len(i) < max(_MIN_POINTS[stage], 3):
                return best
            key = (i.tobytes(), j.tobytes())
            if key == previous:
                break
            previous = key
            w = None if pair_weights is None else pair_weights[i, j]
            try:
                m_new, keep = _robust_fit(stage, sub[i], ref[j], w)
            except ValueError:
                return best
            m = m_new
            i, j = i[keep], j[keep]
            res = np.hypot(*(apply_transform(m, sub[i]) - ref[j]).T)
            best = _Candidate(m, i, j, res)
    return best


def _fixed_pattern(
    c: _Candidate,
    sub: np.ndarray,
    ref: np.ndarray,
    ref_tree: cKDTree,
    model: str,
    pair_weights: _PairWeights | _SigmaWeights | None,
    needed: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Detect sensor defects that a small dither mixed into the star pairs.

    Hot pixels sit at the same pixel coordinates in both lists, i.e. they obey the identity.
    When the true dither is smaller than (or close to) the match radius, refinement pairs them
    too and the least-squares fit lands between the two explanations: off by a fraction of the
    dither, sometimes with an innocent-looking RMS. Test the alternative: pairs better explained
    by the identity than by the fit are set aside and the rest refitted, a few times. If the
    refitted transform moves the set-aside points clearly further than the noise (4 sigma),
    there is a fixed pattern. Returns ``(excluded, matrix)``: a mask of the sub points that
    the identity explains better than the transform without them, and that transform; or
    ``None`` when the identity explains nothing the fit does not.
    """
    i, j = c.sub_idx, c.ref_idx
    d_id = np.hypot(*(sub[i] - ref[j]).T)
    m = c.matrix
    for _ in range(3):
        d_m = np.hypot(*(apply_transform(m, sub[i]) - ref[j]).T)
        fixed = d_id < d_m
        if fixed.sum() < 3 or (~fixed).sum() < needed:
            return None
        ks = np.nonzero(~fixed)[0]
        w = None if pair_weights is None else pair_weights[i[ks], j[ks]]
        try:
            m_new, keep = _robust_fit(model, sub[i[ks]], ref[j[ks]], w)
        except ValueError:
            return None
        converged = np.allclose(m_new, m, rtol=0.0, atol=1e-9)
        m = m_new
        if converged:
            break
    ks = ks[keep]
    res = np.hypot(*(apply_transform(m, sub[i[ks]]) - ref[j[ks]]).T)
    fx = np.nonzero(fixed)[0]
    noise = max(float(np.sqrt(np.mean(res**2))), float(np.sqrt(np.mean(d_id[fx] ** 2))), 1e-3)
    moved = float(np.median(np.hypot(*(apply_transform(m, sub[i[fx]]) - sub[i[fx]]).T)))
    if moved <= 4.0 * noise:
        return None
    # A defect is a sub point that the identity puts on a reference point, clearly (within half
    # the local separation of the two explanations) and better than the sky transform does.
    # Near the transform's fixed point both explanations agree and nothing is excluded.
    separation = np.hypot(*(apply_transform(m, sub) - sub).T)
    d_identity, _ = ref_tree.query(sub)
    d_sky, _ = ref_tree.query(apply_transform(m, sub))
    return (d_identity < 0.5 * separation) & (d_identity < d_sky), m


class _PairWeights:
    """Least-squares weights of star pairs from fluxes, for ``weight_by_flux``.

    A pair weighs ``sqrt(f_sub / median * f_ref / median)`` clipped to [0.1, 10]: centroid
    variance falls with signal, so brighter stars deserve more weight, and the clip keeps a few
    saturated or very bright stars from dominating the fit. Computed per pair on demand (no
    N x N table).
    """

    def __init__(self, flux_sub: np.ndarray, flux_ref: np.ndarray) -> None:
        self._s = self._normalised(flux_sub)
        self._r = self._normalised(flux_ref)

    @staticmethod
    def _normalised(flux: np.ndarray) -> np.ndarray:
        f = np.where(np.isfinite(flux), flux, 0.0)
        positive = f[f > 0]
        scale = float(np.median(positive)) if len(positive) else 1.0
        return np.clip(f / scale, 1e-12, None)

    def __getitem__(self, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        i, j = pairs
        return np.clip(np.sqrt(self._s[i] * self._r[j]), 0.1, 10.0)


class _SigmaWeights:
    """Least-squares weights of star pairs from the stars' positional uncertainties.

    A pair weighs ``1 / (sigma_sub^2 + sigma_ref^2)``: the inverse variance of the offset
    between the two centroids. The star finder gives each star a sigma from its SNR and width
    and an infinite one to saturated stars, whose flat cores centre poorly: they still help to
    find and check the transform, but weigh nothing in the fit. Pairs with no finite weight at
    all fall back to equal weights.
    """

    def __init__(self, sigma_sub: np.ndarray, sigma_ref: np.ndarray) -> None:
        self._s = self._variance(sigma_sub)
        self._r = self._variance(sigma_ref)

    @staticmethod
    def _variance(sigma: np.ndarray) -> np.ndarray:
        v = np.asarray(sigma, np.float64) ** 2
        return np.where(np.isfinite(v) & (v > 0), v, np.inf)

    def __getitem__(self, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        i, j = pairs
        w = 1.0 / (self._s[i] + self._r[j])
        if np.count_nonzero(w) < 3:
            return np.ones(len(w))
        return w / w.max()


def _flux_weights(flux: np.ndarray | None) -> np.ndarray | None:
    """``log(1 + flux / median flux)`` per star: ~0.7 for a typical faint detection, a few for
    bright stars; logarithmic so that a handful of very bright stars cannot outweigh many."""
    if flux is None:
        return None
    positive = flux[np.isfinite(flux) & (flux > 0)]
    if len(positive) == 0:
        return None
    return np.log1p(np.clip(flux / np.median(positive), 0.0, None))


def _rank_key(
    c: _Candidate, n_bright: int, ws: np.ndarray | None, wr: np.ndarray | None
) -> tuple[float, int, float]:
    """Sort key choosing among refined candidates (smallest wins).

    With per-star flux weights ``ws``, ``wr`` (see ``_flux_weights``): the flux-weighted number
    of pairs, so that faint point-like defects agreeing on the identity lose to real stars.
    Without: pairs among the ``n_bright`` first (brightest) stars of both lists. Then total
    pairs, then RMS.
    """
    if ws is not None and wr is not None:
        score = float(np.sum(ws[c.sub_idx] + wr[c.ref_idx])) / 2.0
    else:
        score = float(np.sum((c.sub_idx < n_bright) & (c.ref_idx < n_bright)))
    return (-score, -c.inliers, c.rms)


def _chance_pairs(matrix: np.ndarray, sub: np.ndarray, ref: np.ndarray, radius: float) -> float:
    """Expected number of pairs within ``radius`` px that pure coincidence would produce."""
    lo = ref.min(axis=0)
    hi = ref.max(axis=0)
    area = float(np.prod(hi - lo + 1.0))
    proj = apply_transform(matrix, sub)
    inside = np.all((proj >= lo) & (proj <= hi), axis=1).sum()
    return float(inside) * len(ref) / area * np.pi * radius**2


def _group_leaders(
    mats: np.ndarray, order: np.ndarray, stars: np.ndarray, sep: float, limit: int
) -> np.ndarray:
    """Up to ``limit`` hypotheses, in ``order``, at most one per group of near-identical ones.

    Each hypothesis is summarised by where it puts the centre of the sub's star field and by
    its rotation-scale terms times the field's half-size (both px), quantised to ``sep`` px
    cells; the first hypothesis of each cell leads it. A group straddling a cell boundary may
    get two or more leaders, which only costs a little budget. Without this, a crowd of
    near-copies of one explanation (hot pixels agreeing on the identity, say) fills the whole
    evaluation budget and the true transform is never tried.
    """
    m = mats[order]
    centre = 0.5 * (stars.min(axis=0) + stars.max(axis=0))
    half = max(float(np.max(stars.max(axis=0) - stars.min(axis=0))) / 2.0, 1.0)
    q = np.column_stack(
        [
            m[:, 0, 0] * centre[0] + m[:, 0, 1] * centre[1] + m[:, 0, 2],
            m[:, 1, 0] * centre[0] + m[:, 1, 1] * centre[1] + m[:, 1, 2],
            m[:, 0, 0] * half,
            m[:, 1, 0] * half,
        ]
    )
    cells = np.floor(q / sep).astype(np.int64)
    # hash the 4 cell indices into one integer (wrap-around is harmless: a rare collision
    # only merges two groups)
    primes = np.array([1, 1_000_003, 998_244_353, 2_147_483_629], dtype=np.int64)
    with np.errstate(over="ignore"):
        key = cells @ primes
    _, first = np.unique(key, return_index=True)
    return order[np.sort(first)[:limit]]


def _distinct(
    mats: np.ndarray, order: np.ndarray, corners: np.ndarray, sep: float, limit: int
) -> list[int]:
    """The first ``limit`` hypotheses (in ``order``) that differ by more than ``sep`` px.

    Two hypotheses are the same when they put the corners of the sub's star field within
    ``sep`` px of each other; evaluating or refining both would only repeat work, and a crowd
    of near-copies of one explanation (e.g. hot pixels agreeing on the identity) must not
    push the others out of the budget.
    """
    m = mats[order]
    pos = np.matmul(corners[None], m[:, :, :2].transpose(0, 2, 1)) + m[:, None, :, 2]
    free = np.ones(len(order), dtype=bool)
    chosen: list[int] = []
    while len(chosen) < limit and free.any():
        k = int(np.argmax(free))
        chosen.append(int(order[k]))
        gap = np.max(np.hypot(*(pos - pos[k]).transpose(2, 0, 1)), axis=1)
        free &= gap > sep
    return chosen


def find_transform(
    stars: np.ndarray,
    reference: np.ndarray,
    *,
    model: str = "similarity",
    min_inliers: int = 6,
    max_rms: float = 0.5,
    match_radius: float = 2.0,
    max_stars: int = 60,
    seed: int = 0,
    weight_by_flux: bool = False,
) -> Registration:
    """Find the transform mapping the sub's stars onto the reference's stars.

    ``stars`` and ``reference`` are ``(N, 2)`` arrays of pixel positions ``x, y`` (brightest first
    assumed) or ``(N, 3)`` arrays ``x, y, flux`` in any order (sorted by flux here; supplying the
    flux is the main defence against hot pixels, which are usually faint). ``model`` is
    ``"similarity"`` (rotation + uniform scale + translation) or ``"affine"``. The brightest
    ``max_stars`` of each list build the asterisms; every star takes part in the refinement,
    matched within ``match_radius`` px. ``weight_by_flux`` weights the final least squares by
    flux (both lists must carry one). ``seed`` makes the random part of the search repeatable.

    Raises ``RegistrationError`` when fewer than ``min_inliers`` stars match, when the residual
    RMS of the brighter half of the matched stars exceeds ``max_rms`` px, or when the match is
    no better than chance.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if match_radius <= 0:
        raise ValueError("match_radius must be positive")
    if max_stars < 3:
        raise ValueError("max_stars must be at least 3")
    needed = max(int(min_inliers), _MIN_POINTS[model], 3)
    sub, flux_sub, sigma_sub = _prepare(stars, "stars")
    ref, flux_ref, sigma_ref = _prepare(reference, "reference")
    if len(sub) < needed or len(ref) < needed:
        raise RegistrationError(
            f"too few stars to register: {len(sub)} in the sub, {len(ref)} in the reference "
            f"(need at least {needed})",
            inliers=0,
        )

    sub_b = sub[:max_stars]
    ref_b = ref[:max_stars]
    sub_i, ref_i = match_asterisms(
        build_asterisms(sub_b, K_NEIGHBOURS),
        build_asterisms(ref_b, K_NEIGHBOURS),
        tolerance=DESCRIPTOR_TOLERANCE,
    )
    if len(sub_i) == 0:
        raise RegistrationError("no star pattern of the sub matches one of the reference")

    hyps = similarity_from_triplets(sub_b[sub_i], ref_b[ref_i])
    scale = np.hypot(hyps[:, 0, 0], hyps[:, 1, 0])
    plausible = np.isfinite(scale) & (scale >= SCALE_RANGE[0]) & (scale <= SCALE_RANGE[1])
    hyps, sub_i, ref_i = hyps[plausible], sub_i[plausible], ref_i[plausible]
    if len(hyps) == 0:
        raise RegistrationError("no star pattern of the sub matches one of the reference")

    votes = np.zeros((len(sub_b), len(ref_b)), dtype=np.int32)
    np.add.at(votes, (sub_i.ravel(), ref_i.ravel()), 1)
    support = votes[sub_i, ref_i].sum(axis=1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(hyps))
    order = perm[np.argsort(-support[perm], kind="stable")]

    ref_b_tree = cKDTree(ref_b)
    eval_radius = 1.5 * match_radius
    lo = sub_b.min(axis=0)
    hi = sub_b.max(axis=0)
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]]])
    first = _group_leaders(hyps, order, sub_b, match_radius, N_TOP_HYPOTHESES)
    rest = order[~np.isin(order, first)]
    if len(rest) > N_RANDOM_HYPOTHESES:
        pick = rng.choice(len(rest), N_RANDOM_HYPOTHESES, replace=False)
        first = np.concatenate([first, rest[pick]])
        rest = np.delete(rest, pick)
    else:
        first = np.concatenate([first, rest])
        rest = rest[:0]
    evaluated = first
    counts, cost = _score_hypotheses(hyps[first], sub_b, ref_b_tree, len(ref_b), eval_radius)
    # No convincing consensus yet: keep drawing (in vote order) up to the budget.
    while counts.max() < needed + 2 and len(rest) and len(evaluated) < MAX_HYPOTHESES:
        batch, rest = rest[:200], rest[200:]
        more, more_cost = _score_hypotheses(hyps[batch], sub_b, ref_b_tree, len(ref_b), eval_radius)
        evaluated = np.concatenate([evaluated, batch])
        counts = np.concatenate([counts, more])
        cost = np.concatenate([cost, more_cost])

    # Runners-up far behind the leader, or with no consensus beyond their own triangle, cannot
    # win after refinement; don't spend time on them. (They may still win on fluxes: hot pixels
    # can outnumber stars, so the bar is low.)
    bar = max(RUNNER_UP_FRACTION * counts.max(), min(needed, counts.max()))
    keep = counts >= bar
    ranked = evaluated[keep][np.lexsort((cost[keep], -counts[keep]))]
    attempts = _distinct(hyps, ranked, corners, match_radius, MAX_REFINEMENTS)

    ref_tree = cKDTree(ref)
    weights: _PairWeights | _SigmaWeights | None = None
    if sigma_sub is not None and sigma_ref is not None:
        weights = _SigmaWeights(sigma_sub, sigma_ref)
    elif weight_by_flux and flux_sub is not None and flux_ref is not None:
        weights = _PairWeights(flux_sub, flux_ref)
    ws, wr = _flux_weights(flux_sub), _flux_weights(flux_ref)
    refined: list[_Candidate] = []
    placed: list[np.ndarray] = []
    for h in attempts:
        # a hypothesis whose own triangle an answer already explains would refine to it again
        if any(
            np.all(
                np.hypot(*(apply_transform(r.matrix, sub_b[sub_i[h]]) - ref_b[ref_i[h]]).T)
                < match_radius
            )
            for r in refined
        ):
            continue
        c = _refine(hyps[h], sub, ref, ref_tree, model, match_radius, weights)
        if c is None:
            continue
        pattern = _fixed_pattern(c, sub, ref, ref_tree, model, weights, needed)
        if pattern is not None:
            excluded, m_sky = pattern
            c = _refine(m_sky, sub, ref, ref_tree, model, match_radius, weights, excluded)
            if c is None:
                continue
        # several hypotheses may converge to (nearly) the same answer: keep the better one
        pos = apply_transform(c.matrix, corners)
        same = [
            k for k, p in enumerate(placed) if np.max(np.hypot(*(pos - p).T)) < 0.25 * match_radius
        ]
        if same:
            k = same[0]
            if _rank_key(c, max_stars, ws, wr) < _rank_key(refined[k], max_stars, ws, wr):
                refined[k], placed[k] = c, pos
            continue
        refined.append(c)
        placed.append(pos)
        if len(refined) == N_CANDIDATES:
            break
    if not refined:
        raise RegistrationError("no hypothesis survived refinement (stars do not match)")

    best = min(refined, key=lambda c: _rank_key(c, max_stars, ws, wr))
    inliers, rms, bright_rms = best.inliers, best.rms, best.bright_rms
    if inliers < needed:
        raise RegistrationError(
            f"only {inliers} stars matched (need {needed})", inliers=inliers, rms=rms
        )
    if bright_rms > max_rms:
        raise RegistrationError(
            f"residual RMS of the brighter stars {bright_rms:.3f} px exceeds {max_rms:.3f} px"
            f" ({inliers} stars matched, all-star RMS {rms:.3f} px)",
            inliers=inliers,
            rms=rms,
        )
    chance = _chance_pairs(best.matrix, sub, ref, match_radius)
    if inliers < chance + 5.0 * np.sqrt(chance) + 1.0:
        raise RegistrationError(
            f"{inliers} matched stars are no more than chance coincidences (~{chance:.1f})",
            inliers=inliers,
            rms=rms,
        )
    matrix = np.array(best.matrix, dtype=np.float64)
    matrix.setflags(write=False)
    rot, scl = rotation_scale(matrix)
    return Registration(
        matrix=matrix, inliers=inliers, rms=rms, bright_rms=bright_rms, rotation_deg=rot, scale=scl
    )
