"""Tests for star-based registration (``subwatch.register``) on synthetic star lists.

Star fields are random positions with power-law fluxes on a sky larger than the frame; the
reference sees the stars inside its frame, the sub sees the stars whose *sub* coordinates (the
inverse of the true transform) fall inside its frame, with Gaussian centroid noise. The true
transform is known, so every test compares against it with ``transform_error`` (RMS px over the
frame).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from subwatch.register import (
    Registration,
    RegistrationError,
    apply_transform,
    find_transform,
    invert_transform,
    transform_error,
    warp_image,
)
from subwatch.register.transforms import fit_affine, fit_similarity

W, H = 1600, 1200
CENTRE = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


# --------------------------------------------------------------------------- synthetic fields


def similarity(dx: float = 0.0, dy: float = 0.0, deg: float = 0.0, scale: float = 1.0):
    """Sub -> reference similarity: rotate/scale about the frame centre, then shift by dx, dy."""
    t = np.radians(deg)
    a = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return np.hstack([a, (CENTRE - a @ CENTRE + [dx, dy]).reshape(2, 1)])


def power_law_flux(rng: np.random.Generator, n: int) -> np.ndarray:
    return 200.0 * (1.0 - rng.uniform(size=n)) ** (-1.0 / 1.5)


def in_frame(xy: np.ndarray) -> np.ndarray:
    return (xy[:, 0] >= 0) & (xy[:, 0] <= W - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= H - 1)


def observe(rng: np.random.Generator, m_true: np.ndarray, n_ref: float = 150, noise=0.05):
    """(sub, reference, common) star lists (N, 3: x, y, flux) for a true sub->ref transform.

    ``n_ref`` sets the star density (stars expected in one frame); ``noise`` is the per-axis
    centroid noise (px) of the sub's positions; the reference positions are exact.
    """
    r = np.hypot(W, H)
    n = rng.poisson(n_ref / (W * H) * (2 * r) ** 2)
    sky = CENTRE + rng.uniform(-r, r, (n, 2))
    flux = power_law_flux(rng, n)
    in_ref = in_frame(sky)
    sub_xy = apply_transform(invert_transform(m_true), sky)
    in_sub = in_frame(sub_xy)
    ref = np.column_stack([sky[in_ref], flux[in_ref]])
    k = int(in_sub.sum())
    sub = np.column_stack(
        [sub_xy[in_sub] + rng.normal(0.0, noise, (k, 2)), flux[in_sub] * rng.uniform(0.8, 1.2, k)]
    )
    return sub, ref, int((in_ref & in_sub).sum())


def true_pairs(sub: np.ndarray, ref: np.ndarray, m_true: np.ndarray, tol: float = 0.5):
    """Indices (into sub, into ref) of the stars the two lists really have in common."""
    d, j = cKDTree(ref[:, :2]).query(apply_transform(m_true, sub), distance_upper_bound=tol)
    i = np.nonzero(np.isfinite(d))[0]
    return i, j[i]


def random_points(rng: np.random.Generator, n: int, flux: np.ndarray | None = None):
    xy = rng.uniform([0, 0], [W - 1, H - 1], (n, 2))
    return np.column_stack([xy, power_law_flux(rng, n) if flux is None else flux])


def assert_recovers(reg: Registration, m_true: np.ndarray, tol: float = 0.05) -> float:
    err = transform_error(reg.matrix, m_true, W, H)
    assert err < tol, f"transform off by {err:.4f} px RMS over the frame"
    assert reg.rms < 0.2
    return err


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


# --------------------------------------------------------------------------- geometry cases


def test_translation_only():
    rng = np.random.default_rng(1)
    m = similarity(37.25, -18.6)
    sub, ref, common = observe(rng, m)
    reg = find_transform(sub, ref)
    assert_recovers(reg, m, tol=0.03)
    assert reg.inliers >= 0.95 * common
    assert angle_diff(reg.rotation_deg, 0.0) < 0.01
    assert reg.scale == pytest.approx(1.0, abs=1e-4)
    assert reg.matrix.shape == (2, 3) and reg.matrix.dtype == np.float64


@pytest.mark.parametrize("deg", [90.0, 180.0, 137.0, -63.5, 0.4])
def test_rotation_any_angle(deg):
    rng = np.random.default_rng(int(abs(deg) * 10))
    m = similarity(21.7, 9.3, deg)
    sub, ref, common = observe(rng, m)
    reg = find_transform(sub, ref)
    assert_recovers(reg, m, tol=0.03)
    assert reg.inliers >= 0.95 * common
    assert angle_diff(reg.rotation_deg, deg) < 0.01


@pytest.mark.parametrize("scale", [0.95, 1.05])
def test_scale_change(scale):
    rng = np.random.default_rng(int(scale * 100))
    m = similarity(-12.0, 30.5, 20.0, scale)
    sub, ref, common = observe(rng, m)
    reg = find_transform(sub, ref)
    assert_recovers(reg, m, tol=0.03)
    assert reg.scale == pytest.approx(scale, abs=1e-4)
    assert reg.inliers >= 0.95 * common


@pytest.mark.parametrize(("dx", "deg"), [(W / 2, 0.0), (-W / 2, 180.0), (W / 2, 33.0)])
def test_half_overlap(dx, deg):
    rng = np.random.default_rng(7)
    m = similarity(dx, 15.0, deg)
    sub, ref, common = observe(rng, m, n_ref=100)
    assert common < 0.65 * min(len(sub), len(ref))  # really only about half in common
    reg = find_transform(sub, ref)
    # the right pairs were found: the fit is (nearly) their least-squares fit ...
    i, j = true_pairs(sub, ref, m)
    assert len(i) == common
    oracle = fit_similarity(sub[i, :2], ref[j, :2])
    assert transform_error(reg.matrix, oracle, W, H) < 0.01
    # ... and the non-overlapping half of the frame is extrapolated from them
    assert_recovers(reg, m, tol=0.1)
    assert reg.inliers >= 0.95 * common


def test_exactly_eight_common_stars():
    """8 stars in the overlap strip, 25 stars only in each frame, rotated and scaled."""
    rng = np.random.default_rng(3)
    m = similarity(0.6 * W, 0.3 * H, 137.0, 1.04)
    m_inv = invert_transform(m)
    common, ref_only, sub_only = [], [], []
    r = np.hypot(W, H)
    while len(common) < 8 or len(ref_only) < 25 or len(sub_only) < 25:
        p = CENTRE + rng.uniform(-r, r, (1, 2))
        a, b = in_frame(p)[0], in_frame(apply_transform(m_inv, p))[0]
        if a and b and len(common) < 8:
            common.append(p[0])
        elif a and not b and len(ref_only) < 25:
            ref_only.append(p[0])
        elif b and not a and len(sub_only) < 25:
            sub_only.append(p[0])
    ref_xy = np.vstack([common, ref_only])
    sub_xy = apply_transform(m_inv, np.vstack([common, sub_only]))
    sub_xy += rng.normal(0.0, 0.05, sub_xy.shape)
    f_ref = power_law_flux(rng, 33)
    f_sub = np.concatenate([f_ref[:8], power_law_flux(rng, 25)])
    reg = find_transform(np.column_stack([sub_xy, f_sub]), np.column_stack([ref_xy, f_ref]))
    assert reg.inliers == 8
    # exactly the 8 true pairs were used: the fit is their least-squares fit ...
    oracle = fit_similarity(sub_xy[:8], ref_xy[:8])
    assert transform_error(reg.matrix, oracle, W, H) < 1e-6
    # ... which, from 8 stars in one strip, extrapolates loosely to the far side of the frame
    assert_recovers(reg, m, tol=0.5)
    assert angle_diff(reg.rotation_deg, 137.0) < 0.1


def test_spurious_detections_in_both_lists():
    """20% cosmic rays (random positions, power-law fluxes, so some are bright) in each list."""
    rng = np.random.default_rng(11)
    m = similarity(40.0, -20.0, 137.0)
    sub, ref, common = observe(rng, m)
    sub = np.vstack([sub, random_points(rng, len(sub) // 5)])
    ref = np.vstack([ref, random_points(rng, len(ref) // 5)])
    reg = find_transform(sub, ref)
    assert_recovers(reg, m, tol=0.03)
    assert common <= reg.inliers <= common + 2


def _hot_pixel_scene(rng: np.random.Generator, n_hot: int, dither=(12.3, -7.8), deg=0.05):
    """40 real stars dithered by ``dither`` px and ``deg`` degrees, plus hot pixels that sit at
    the same sensor coordinates (exactly) in both lists and are faint."""
    m = similarity(dither[0], dither[1], deg)
    ref_xy = rng.uniform([20, 20], [W - 20, H - 20], (40, 2))
    flux = 5.0 * power_law_flux(rng, 40)
    sub_xy = apply_transform(invert_transform(m), ref_xy) + rng.normal(0.0, 0.05, (40, 2))
    hot = rng.uniform([0, 0], [W - 1, H - 1], (n_hot, 2))
    f_hot = rng.uniform(20.0, 60.0, n_hot)
    sub = np.vstack([np.column_stack([sub_xy, flux * 1.1]), np.column_stack([hot, f_hot])])
    ref = np.vstack([np.column_stack([ref_xy, flux]), np.column_stack([hot, f_hot])])
    return m, sub[rng.permutation(len(sub))], ref[rng.permutation(len(ref))]


def _brightest_first(stars: np.ndarray) -> np.ndarray:
    """Positions only, ordered brightest first, as ``find_transform`` assumes without fluxes."""
    return stars[np.argsort(-stars[:, 2]), :2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_hot_pixels_do_not_pull_to_identity(seed):
    rng = np.random.default_rng(100 + seed)
    m, sub, ref = _hot_pixel_scene(rng, 30)
    # the identity really is a competing explanation: it puts 30 points exactly on 30 points
    assert np.sum(np.all(np.isin(sub[:, :2], ref[:, :2]), axis=1)) == 30
    # with a flux column, and positions only listed brightest first (the contract)
    for s, r in [(sub, ref), (_brightest_first(sub), _brightest_first(ref))]:
        reg = find_transform(s, r)
        assert transform_error(reg.matrix, IDENTITY, W, H) > 5.0
        assert_recovers(reg, m)
        assert reg.inliers == 40


@pytest.mark.parametrize("dither", [(0.5, 0.2), (1.2, -0.9), (2.5, 1.0)])
def test_hot_pixels_with_dither_below_match_radius(dither):
    """A dither smaller than the match radius pairs hot pixels *and* stars under one transform;
    a plain least-squares fit would land between the two explanations (off by ~40% of the
    dither) with an innocent RMS. The fixed pattern must be recognised and dropped."""
    rng = np.random.default_rng(31)
    m, sub, ref = _hot_pixel_scene(rng, 30, dither)
    for s, r in [(sub, ref), (_brightest_first(sub), _brightest_first(ref))]:
        reg = find_transform(s, r)
        assert_recovers(reg, m, tol=0.04)
        # a star where this transform happens to coincide with the identity is ambiguous
        assert 38 <= reg.inliers <= 40


def test_no_dither_with_hot_pixels_and_self_registration():
    """When the true transform *is* the identity, hot pixels agree with it: nothing to split."""
    rng = np.random.default_rng(41)
    m, sub, ref = _hot_pixel_scene(rng, 30, dither=(0.0, 0.0), deg=0.0)
    np.testing.assert_allclose(m, IDENTITY, atol=1e-12)
    reg = find_transform(sub, ref)
    assert_recovers(reg, IDENTITY, tol=0.03)
    assert reg.inliers == 70
    same = find_transform(ref, ref)
    assert transform_error(same.matrix, IDENTITY, W, H) < 1e-9
    assert same.inliers == len(ref) and same.rms < 1e-9


@pytest.mark.parametrize("max_stars", [60, 100])
def test_flux_column_beats_more_hot_pixels_than_stars(max_stars):
    """60 faint hot pixels vs 40 stars: only the fluxes can tell them apart, also when every
    point takes part in the asterisms (max_stars=100)."""
    rng = np.random.default_rng(5)
    m, sub, ref = _hot_pixel_scene(rng, 60)
    reg = find_transform(sub, ref, max_stars=max_stars)
    assert transform_error(reg.matrix, IDENTITY, W, H) > 5.0
    assert_recovers(reg, m)
    assert reg.inliers == 40


def test_affine_model_recovers_shear():
    rng = np.random.default_rng(21)
    a = np.array([[1.0, 0.01], [0.0, 1.0]]) @ similarity(deg=25.0)[:, :2]
    m = np.hstack([a, (CENTRE - a @ CENTRE + [15.0, -9.0]).reshape(2, 1)])
    sub, ref, common = observe(rng, m)
    reg = find_transform(sub, ref, model="affine")
    assert_recovers(reg, m, tol=0.03)
    assert reg.inliers >= 0.95 * common
    # a similarity cannot explain a 1% shear (up to ~8 px at the corners): it must say so
    with pytest.raises(RegistrationError) as info:
        find_transform(sub, ref, model="similarity")
    assert info.value.rms is None or info.value.rms > 0.5 or info.value.inliers < 6


# --------------------------------------------------------------------------- accuracy


def test_accuracy_reaches_least_squares_floor():
    """100 stars, 0.05 px (2D RMS) centroid noise: the fit must be within 0.01 px RMS over the
    frame, and equal to the least-squares fit on the true correspondences (the statistical
    floor, ~2*sigma_axis/sqrt(N) = 0.007 px here); any spurious pair or lost star would show."""
    sigma_axis = 0.05 / np.sqrt(2.0)
    # a dither with a little field rotation, so that the stars cover the frame
    m = similarity(20.4, -33.1, 1.5, 1.002)
    errors = []
    for seed in range(10):
        rng = np.random.default_rng(1000 + seed)
        ref_xy = rng.uniform([0, 0], [W - 1, H - 1], (400, 2))
        sub_xy = apply_transform(invert_transform(m), ref_xy)
        keep = np.nonzero(in_frame(sub_xy))[0][:100]
        ref_xy, sub_xy = ref_xy[keep], sub_xy[keep] + rng.normal(0.0, sigma_axis, (100, 2))
        flux = power_law_flux(rng, 100)
        reg = find_transform(np.column_stack([sub_xy, flux]), np.column_stack([ref_xy, flux]))
        assert reg.inliers == 100
        oracle = fit_similarity(sub_xy, ref_xy)
        assert transform_error(reg.matrix, oracle, W, H) < 1e-6
        errors.append(transform_error(reg.matrix, m, W, H))
    errors = np.array(errors)
    assert np.sqrt(np.mean(errors**2)) < 0.01
    assert errors.max() < 0.02


def test_weight_by_flux_helps_when_faint_stars_are_noisier():
    """Background-limited centroids (noise ~ 1/flux): flux weights must beat uniform ones."""
    m = similarity(5.0, 7.0, 12.0)
    plain, weighted = [], []
    for seed in range(10):
        rng = np.random.default_rng(200 + seed)
        ref_xy = rng.uniform([0, 0], [W - 1, H - 1], (400, 2))
        sub_xy = apply_transform(invert_transform(m), ref_xy)
        keep = np.nonzero(in_frame(sub_xy))[0][:100]
        flux = power_law_flux(rng, 100)
        sigma = 0.1 * np.median(flux) / flux
        sub = np.column_stack([sub_xy[keep] + rng.normal(0, 1, (100, 2)) * sigma[:, None], flux])
        ref = np.column_stack([ref_xy[keep], flux])
        plain.append(transform_error(find_transform(sub, ref).matrix, m, W, H))
        reg = find_transform(sub, ref, weight_by_flux=True)
        weighted.append(transform_error(reg.matrix, m, W, H))
    assert np.sqrt(np.mean(np.square(weighted))) < 0.85 * np.sqrt(np.mean(np.square(plain)))


def test_sigma_column_weighs_pairs_and_ignores_saturated_centroids():
    """(N, 4) lists carry each star's positional sigma: pairs weigh by inverse variance and
    stars with an infinite sigma (saturated, biased centroids) weigh nothing in the fit."""
    m = similarity(5.0, 7.0, 12.0)
    plain, weighted = [], []
    for seed in range(10):
        rng = np.random.default_rng(300 + seed)
        ref_xy = rng.uniform([0, 0], [W - 1, H - 1], (400, 2))
        sub_xy = apply_transform(invert_transform(m), ref_xy)
        keep = np.nonzero(in_frame(sub_xy))[0][:100]
        flux = power_law_flux(rng, 100)
        sigma = np.hypot(0.1 * np.median(flux) / flux, 0.01)
        noisy = sub_xy[keep] + rng.normal(0, 1, (100, 2)) * sigma[:, None]
        # the 8 brightest are saturated: flat cores, centroids off by 0.3 px the same way
        saturated = np.argsort(-flux)[:8]
        noisy[saturated] += [0.3, -0.2]
        sigma[saturated] = np.inf
        ref = np.column_stack([ref_xy[keep], flux, np.full(100, 0.01)])
        sub3 = np.column_stack([noisy, flux])
        plain.append(transform_error(find_transform(sub3, ref[:, :3]).matrix, m, W, H))
        reg = find_transform(np.column_stack([sub3, sigma]), ref)
        weighted.append(transform_error(reg.matrix, m, W, H))
        assert reg.inliers >= 90  # the saturated stars still count as matched
    assert np.sqrt(np.mean(np.square(weighted))) < 0.5 * np.sqrt(np.mean(np.square(plain)))
    assert np.sqrt(np.mean(np.square(weighted))) < 0.03, weighted


# --------------------------------------------------------------------------- never silently wrong


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unrelated_fields_raise(seed):
    rng = np.random.default_rng(seed)
    sub = random_points(rng, 200)
    ref = random_points(rng, 200)
    with pytest.raises(RegistrationError) as info:
        find_transform(sub, ref)
    err = info.value
    assert isinstance(err.inliers, int)
    assert err.inliers < 6 or (err.rms is not None and err.rms > 0.5)
    assert str(err)


def test_too_few_stars_raise():
    rng = np.random.default_rng(2)
    ref = random_points(rng, 50)
    with pytest.raises(RegistrationError) as info:
        find_transform(ref[:4], ref)
    assert info.value.inliers == 0
    assert info.value.rms is None
    with pytest.raises(RegistrationError):
        find_transform(np.empty((0, 3)), ref)


def test_rms_above_limit_raises_with_numbers():
    """A correct match on badly measured stars is refused when max_rms asks for better."""
    rng = np.random.default_rng(4)
    m = similarity(5.0, 5.0, 10.0)
    sub, ref, common = observe(rng, m, noise=0.3)
    assert find_transform(sub, ref).inliers > 0.8 * common  # fine at the default limit
    with pytest.raises(RegistrationError) as info:
        find_transform(sub, ref, max_rms=0.2)
    assert info.value.rms is not None and info.value.rms > 0.2
    assert info.value.inliers > 0.8 * common


def test_min_inliers_is_enforced():
    rng = np.random.default_rng(8)
    m = similarity(3.0, 4.0)
    sub, ref, common = observe(rng, m, n_ref=30)
    with pytest.raises(RegistrationError) as info:
        find_transform(sub, ref, min_inliers=common + 5)
    assert info.value.inliers <= common


# --------------------------------------------------------------------------- API behaviour


def test_deterministic_and_order_independent_with_flux():
    rng = np.random.default_rng(9)
    m = similarity(-8.0, 14.0, 77.0)
    sub, ref, _ = observe(rng, m)
    a = find_transform(sub, ref, seed=3)
    b = find_transform(sub, ref, seed=3)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    c = find_transform(sub[rng.permutation(len(sub))], ref[rng.permutation(len(ref))])
    assert transform_error(a.matrix, c.matrix, W, H) < 1e-9
    # positions only, brightest first
    d = find_transform(
        sub[np.argsort(-sub[:, 2]), :2], ref[np.argsort(-ref[:, 2]), :2], match_radius=1.5
    )
    assert transform_error(a.matrix, d.matrix, W, H) < 1e-9


def test_registration_is_frozen():
    rng = np.random.default_rng(10)
    m = similarity(1.0, 2.0)
    sub, ref, _ = observe(rng, m, n_ref=60)
    reg = find_transform(sub, ref)
    with pytest.raises(ValueError):
        reg.matrix[0, 2] = 0.0
    with pytest.raises(AttributeError):
        reg.inliers = 3  # type: ignore[misc]


def test_bad_arguments():
    pts = np.zeros((10, 5))
    with pytest.raises(ValueError):
        find_transform(pts, pts)
    with pytest.raises(ValueError):
        find_transform(np.zeros((10, 2)), np.zeros((10, 2)), model="projective")


def test_transform_helpers():
    rng = np.random.default_rng(12)
    m = similarity(3.5, -2.25, 31.0, 1.02)
    xy = rng.uniform(0, 1000, (50, 2))
    back = apply_transform(invert_transform(m), apply_transform(m, xy))
    np.testing.assert_allclose(back, xy, atol=1e-9)
    # the contract, written out: [xr, yr] = M[:, :2] @ [x, y] + M[:, 2]
    np.testing.assert_allclose(apply_transform(m, xy[:1])[0], m[:, :2] @ xy[0] + m[:, 2])
    assert transform_error(m, m, W, H) == 0.0
    shifted = m.copy()
    shifted[:, 2] += [0.3, 0.4]
    assert transform_error(shifted, m, W, H) == pytest.approx(0.5)
    # rotation error grows towards the corners: RMS over the frame, not at the centre only
    rotated = similarity(deg=0.01)
    # (the variance of 32 evenly spaced samples of [0, L] is L^2 * 33 / (12 * 31))
    var = ((W - 1) ** 2 + (H - 1) ** 2) * 33 / (12 * 31)
    expected = 2 * np.sin(np.radians(0.01) / 2) * np.sqrt(var)
    assert transform_error(rotated, IDENTITY, W, H) == pytest.approx(expected, rel=0.02)
    # least-squares fits are exact on exact data
    aff = np.array([[1.01, 0.02, 5.0], [-0.015, 0.99, -3.0]])
    np.testing.assert_allclose(fit_affine(xy, apply_transform(aff, xy)), aff, atol=1e-10)
    np.testing.assert_allclose(fit_similarity(xy, apply_transform(m, xy)), m, atol=1e-10)
    with pytest.raises(ValueError):
        invert_transform(np.zeros((2, 3)))


# --------------------------------------------------------------------------- warp


def _render(shape: tuple[int, int], stars, sigma: float = 1.6) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros(shape)
    for x, y, f in stars:
        img += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


def _centroid(img: np.ndarray, x: float, y: float, r: int = 7) -> tuple[float, float]:
    x0, y0 = round(x), round(y)
    win = img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1].astype(np.float64)
    yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    return float((win * xx).sum() / win.sum()), float((win * yy).sum() / win.sum())


# 7.3 degrees: OpenCV for every interpolator; 1.3 and 181.3: cubic by the two-pass warp
@pytest.mark.parametrize("degrees", [7.3, 1.3, 181.3])
@pytest.mark.parametrize("interpolation", ["lanczos", "cubic", "linear"])
def test_warp_puts_stars_where_apply_transform_says(interpolation, degrees):
    h, w = 200, 240
    t = np.radians(degrees)
    a = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.array([w / 2, h / 2])
    m = np.hstack([a, (c - a @ c + [6.37, -5.81]).reshape(2, 1)])
    stars = [(60.3, 50.7, 1000.0), (150.25, 120.6, 500.0), (110.8, 90.1, 800.0)]
    img = _render((h, w), stars)
    warped, coverage = warp_image(img, m, (h, w), interpolation)
    assert warped.dtype == np.float32 and coverage.dtype == bool
    assert warped.shape == (h, w) and coverage.shape == (h, w)
    moved = [(*apply_transform(m, [[x, y]])[0], f) for x, y, f in stars]
    truth = _render((h, w), moved)  # the same stars drawn where the transform puts them
    # Keys' cubic with a = -0.75 (OpenCV's, and ours) moves a centroid by up to ~0.1 px with
    # the sub-pixel phase (benchmarks/bench_warp.py: 0.048 px RMS over many stars)
    tolerance = 0.08 if interpolation == "cubic" else 0.05
    for (x, y, _), (px, py, _) in zip(stars, moved, strict=True):
        # centroids in the same window of the warped and the directly drawn image: the
        # window's own bias cancels, what is left is the warp's
        cx, cy = _centroid(warped, px, py)
        tx, ty = _centroid(truth, px, py)
        assert np.hypot(cx - tx, cy - ty) < tolerance
        if degrees < 90:  # (a half turn about the centre is nearly its own inverse)
            # the star is not where the inverse convention would have put it
            qx, qy = apply_transform(invert_transform(m), [[x, y]])[0]
            assert np.hypot(qx - px, qy - py) > 1.0
    # coverage: exactly the output pixels whose kernel (the sample +- its reach) lies inside
    reach = {"lanczos": 4, "cubic": 2, "linear": 0}[interpolation]
    yy, xx = np.mgrid[0:h, 0:w]
    src = apply_transform(invert_transform(m), np.column_stack([xx.ravel(), yy.ravel()]))
    sx, sy = src[:, 0].reshape(h, w), src[:, 1].reshape(h, w)
    inside = (sx >= reach) & (sx <= w - 1 - reach) & (sy >= reach) & (sy <= h - 1 - reach)
    outside = (sx < -1) | (sx > w) | (sy < -1) | (sy > h)
    assert inside.sum() > 0.8 * h * w and outside.sum() > 0.02 * h * w
    np.testing.assert_array_equal(coverage, inside)
    assert np.all(warped[outside] == 0.0)
    # where covered the warp is exact: a flat sub stays flat right up to the rim, and the rim
    # just outside the coverage is biased (which is why it is left out)
    flat, flat_cov = warp_image(np.full((h, w), 100.0, np.float32), m, (h, w), interpolation)
    np.testing.assert_allclose(flat[flat_cov], 100.0, rtol=2e-3)
    if reach:
        ring = ~flat_cov & ~outside & (flat != 0)
        assert np.abs(flat[ring] - 100.0).max() > 1.0


def test_warp_channel_last_and_flip():
    h, w = 60, 80
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 10.0, (h, w)).astype(np.float32)
    # a meridian flip: 180 degrees about the frame centre maps the grid onto itself exactly
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    m = np.hstack([-np.eye(2), (2 * c).reshape(2, 1)])
    flipped, cov = warp_image(img, m, (h, w), "lanczos")
    np.testing.assert_allclose(flipped, img[::-1, ::-1], atol=1e-3)
    # the kernel's reach at the frame edge is not counted as covered, the rest is
    assert np.all(cov[4:-4, 4:-4]) and not np.any(cov[:4])
    rgb = np.stack([img, 2 * img, 3 * img], axis=-1)
    out, cov3 = warp_image(rgb, m, (h, w))
    assert out.shape == (h, w, 3) and cov3.shape == (h, w)
    np.testing.assert_allclose(out[..., 2], 3 * flipped, rtol=1e-5)
    many = np.concatenate([rgb, rgb], axis=-1)  # more channels than one OpenCV call takes
    out6, _ = warp_image(many, m, (h, w))
    assert out6.shape == (h, w, 6)
    np.testing.assert_allclose(out6[..., 4], out[..., 1], rtol=1e-6)
    with pytest.raises(ValueError):
        warp_image(img, m, (h, w), "nearest-ish")
