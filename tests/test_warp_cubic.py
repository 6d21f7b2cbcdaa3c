"""The two-pass cubic warp: same result as a direct 2D bicubic warp (and OpenCV's), stars
kept where the transform puts them, the right cases handed back to OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from subwatch.register import apply_transform, warp_image
from subwatch.register.cubic import two_pass_plan, warp_cubic_two_pass
from test_register import _render  # Gaussian stars, sigma 1.6 px


def _similarity(degrees: float, scale: float, shift: tuple[float, float], shape) -> np.ndarray:
    h, w = shape
    t = np.radians(degrees)
    a = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.array([w / 2, h / 2])
    return np.hstack([a, (c - a @ c + np.asarray(shift)).reshape(2, 1)])


def _keys(s: np.ndarray, a: float = -0.75) -> np.ndarray:
    s = np.abs(s)
    near = (a + 2) * s**3 - (a + 3) * s**2 + 1
    far = a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0))


def _direct_warp(img: np.ndarray, m: np.ndarray, shape) -> np.ndarray:
    """The 2D bicubic warp (Keys, a = -0.75) written out in numpy: 16 taps per output pixel."""
    h, w = shape
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * uu + inv[0, 1] * vv + inv[0, 2]
    sy = inv[1, 0] * uu + inv[1, 1] * vv + inv[1, 2]
    ix, iy = np.floor(sx).astype(int), np.floor(sy).astype(int)
    out = np.zeros(shape)
    for j in range(-1, 3):
        for i in range(-1, 3):
            yy, xx = iy + j, ix + i
            ok = (yy >= 0) & (yy < img.shape[0]) & (xx >= 0) & (xx < img.shape[1])
            val = np.where(
                ok, img[np.clip(yy, 0, img.shape[0] - 1), np.clip(xx, 0, img.shape[1] - 1)], 0
            )
            out += val * _keys(sx - xx) * _keys(sy - yy)
    return out


def _moments(img: np.ndarray, x: float, y: float, r: int = 8) -> tuple[float, float, float]:
    x0, y0 = round(x), round(y)
    win = img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1].astype(np.float64)
    yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    cx, cy = (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()
    return cx, cy, ((win * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / win.sum()) ** 0.5


@pytest.mark.parametrize(
    ("degrees", "scale"),
    [(0.0, 1.0), (0.7, 1.0), (-3.0, 1.04), (4.5, 0.97), (90.4, 1.0), (179.2, 1.01)],
)
def test_two_passes_equal_the_direct_2d_warp(degrees, scale):
    rng = np.random.default_rng(3)
    h, w = 90, 120
    img = rng.normal(100.0, 20.0, (h, w)).astype(np.float32)
    m = _similarity(degrees, scale, (2.3, -1.7), (h, w))
    plan = two_pass_plan(m, (h, w))
    assert plan is not None
    ours = warp_cubic_two_pass(img, plan, (h, w))
    direct = _direct_warp(img, m, (h, w))
    _, coverage = warp_image(img, m, (h, w), "cubic")
    assert coverage.mean() > 0.5
    diff = (ours - direct)[coverage]
    # separable along the sheared frame's axes rather than the output's: equal with no
    # rotation, and apart by a small fraction of white noise (interpolation's hardest case)
    # growing with the residual angle (measured: 0.45-0.50 noise sigma per radian)
    residual = np.radians(degrees - 90 * round(degrees / 90))
    assert np.sqrt(np.mean(diff**2)) <= 20 * (1e-5 + 0.6 * abs(residual))


@pytest.mark.parametrize(
    ("degrees", "shift"),
    [(0.0, (0.3, 0.6)), (1.3, (6.37, -5.81)), (-2.2, (-4.5, 3.25)), (180.6, (1.1, 0.4))],
)
def test_stars_land_where_opencv_puts_them(degrees, shift):
    """Same kernel as OpenCV's bicubic, so the same centroids (OpenCV rounds sample positions
    to 1/32 px: up to 0.016 px apart) and widths; the kernel itself moves centroids by a few
    hundredths of a pixel with the sub-pixel phase, which a=-0.5 (Catmull-Rom) would not."""
    h, w = 160, 200
    stars = [
        (60.3, 50.7, 1000.0),
        (150.25, 110.6, 500.0),
        (100.8, 80.1, 800.0),
        (40.45, 120.9, 300.0),
    ]
    m = _similarity(degrees, 1.0, shift, (h, w))
    img = _render((h, w), stars)
    warped, coverage = warp_image(img, m, (h, w), "cubic")
    opencv = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC)
    catmull_rom = warp_cubic_two_pass(img, two_pass_plan(m, (h, w)), (h, w), keys_a=-0.5)
    truth = _render((h, w), [(*apply_transform(m, [[x, y]])[0], f) for x, y, f in stars])
    for x, y, _ in stars:
        px, py = apply_transform(m, [[x, y]])[0]
        assert coverage[round(py), round(px)]
        cx, cy, width = _moments(warped, px, py)
        ox, oy, owidth = _moments(opencv, px, py)
        tx, ty, twidth = _moments(truth, px, py)
        assert np.hypot(cx - ox, cy - oy) < 0.02 and abs(width / owidth - 1) < 0.002
        assert np.hypot(cx - tx, cy - ty) < 0.1
        rx, ry, rwidth = _moments(catmull_rom, px, py)
        assert np.hypot(rx - tx, ry - ty) < 0.005 and abs(rwidth / twidth - 1) < 0.005


def test_quarter_turns_are_exact():
    rng = np.random.default_rng(4)
    h, w = 40, 64
    img = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
    # np.rot90(img, 1): source (x, y) -> (y, w - 1 - x), an output of shape (w, h)
    m = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0]])
    plan = two_pass_plan(m, (h, w))
    assert plan is not None and plan.quarter_turns == 1
    out, coverage = warp_image(img, m, (w, h), "cubic")
    np.testing.assert_allclose(out[coverage], np.rot90(img, 1)[coverage], atol=1e-5)
    assert coverage[2:-2, 2:-2].all()


@pytest.mark.parametrize(
    "matrix",
    [
        _similarity(6.0, 1.0, (0, 0), (100, 100)),  # beyond 5 degrees from a quarter turn
        _similarity(0.0, 1.2, (0, 0), (100, 100)),  # a scale change far beyond a night's
        np.array([[-1.0, 0.0, 99.0], [0.0, 1.0, 0.0]]),  # a mirror
        np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0]]),  # a shear (affine fit)
    ],
)
def test_transforms_far_from_the_identity_go_to_opencv(matrix):
    assert two_pass_plan(matrix, (100, 100)) is None
    assert two_pass_plan(np.zeros((2, 3)), (100, 100)) is None  # degenerate
    img = np.full((100, 100), 5.0, np.float32)
    out, coverage = warp_image(img, matrix, (100, 100), "cubic")  # still warped, by OpenCV
    if coverage.any():
        np.testing.assert_allclose(out[coverage], 5.0, rtol=1e-3)


def test_output_of_another_size_and_a_non_contiguous_input():
    rng = np.random.default_rng(5)
    big = rng.normal(10.0, 1.0, (80, 100)).astype(np.float64)
    img = big[::2, ::2]  # (40, 50), strided, float64
    m = _similarity(1.0, 1.0, (5.0, 3.0), (40, 50))
    plan = two_pass_plan(m, img.shape)
    out = warp_cubic_two_pass(img, plan, (60, 70))
    assert out.shape == (60, 70) and out.dtype == np.float32
    np.testing.assert_allclose(out, _direct_warp(img.astype(np.float32), m, (60, 70)), atol=0.05)


def test_colour_goes_channel_by_channel_like_opencv():
    rng = np.random.default_rng(6)
    h, w = 70, 90
    rgb = cv2.GaussianBlur(rng.normal(100.0, 20.0, (h, w, 3)).astype(np.float32), (0, 0), 1.5)
    m = _similarity(0.8, 1.0, (1.5, -2.25), (h, w))
    out, coverage = warp_image(rgb, m, (h, w), "cubic")
    assert out.shape == (h, w, 3) and out.dtype == np.float32
    opencv = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_CUBIC)
    for c in range(3):
        mono, _ = warp_image(np.ascontiguousarray(rgb[:, :, c]), m, (h, w), "cubic")
        np.testing.assert_array_equal(out[:, :, c], mono)
        np.testing.assert_allclose(out[:, :, c][coverage], opencv[:, :, c][coverage], atol=0.05)
