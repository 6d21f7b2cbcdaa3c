"""The variance-stabilising transform: unit noise, unbiased inverse, noise model from the image."""

from __future__ import annotations

import numpy as np
import pytest

from subwatch.enhance.vst import (
    NoiseModel,
    _binned_variance,
    algebraic_inverse,
    estimate_noise_model,
    forward,
    inverse,
)


def _poisson_gaussian(
    rng: np.random.Generator, lam: np.ndarray | float, gain: float, rn: float, pedestal: float, n
):
    """ADU = pedestal + gain * Poisson(lam) + N(0, rn): variance rn^2 + gain * (x - pedestal)."""
    return pedestal + gain * rng.poisson(lam, n) + rng.normal(0.0, rn, n)


@pytest.mark.parametrize("lam", [5.0, 30.0, 300.0, 5000.0])
def test_forward_gives_unit_noise(lam: float) -> None:
    rng = np.random.default_rng(1)
    nm = NoiseModel(gain=0.8, sigma=3.0, offset=500.0)
    x = _poisson_gaussian(rng, lam, 0.8, 3.0, 500.0, 400_000)
    y = forward(x, nm)
    assert y.dtype == np.float32
    assert abs(float(np.std(y)) - 1.0) < 0.03


def test_forward_on_a_sky_offset_stack_model() -> None:
    """The stack case: offset at the sky, sigma the noise there; pixels below the sky too."""
    rng = np.random.default_rng(2)
    gain, sky = 0.02, 1500.0
    sigma = np.sqrt(gain * sky + 4.0)
    nm = NoiseModel(gain=gain, sigma=float(sigma), offset=sky)
    for level in (sky - 2 * sigma, sky, sky + 50 * sigma, sky + 5000 * sigma):
        var = sigma**2 + gain * (level - sky)
        y = forward(rng.normal(level, np.sqrt(var), 200_000), nm)
        assert abs(float(np.std(y)) - 1.0) < 0.03


@pytest.mark.parametrize("lam", [1.0, 2.0, 3.0, 5.0])
def test_inverse_is_unbiased_at_low_counts(lam: float) -> None:
    rng = np.random.default_rng(3)
    gain, rn, ped = 1.0, 1.0, 100.0
    nm = NoiseModel(gain=gain, sigma=rn, offset=ped)
    x = _poisson_gaussian(rng, lam, gain, rn, ped, 2_000_000)
    mean_y = np.float32(np.mean(forward(x, nm), dtype=np.float64))
    unbiased = float(inverse(mean_y, nm)) - ped
    algebraic = float(algebraic_inverse(mean_y, nm)) - ped
    assert abs(unbiased - lam) < 0.1 * lam
    assert abs(unbiased - lam) < 0.5 * abs(algebraic - lam)


def test_inverse_undoes_forward_at_high_counts() -> None:
    nm = NoiseModel(gain=0.5, sigma=12.0, offset=800.0)
    x = np.linspace(700.0, 60000.0, 1000).astype(np.float32)
    back = inverse(forward(x, nm), nm)
    assert back.dtype == np.float32
    # the unbiased inverse differs from the algebraic one by ~gain/4 (its bias correction)
    np.testing.assert_allclose(back, x, atol=0.5 * nm.gain + 1e-3 * 60000 * 1e-3)


def test_zero_gain_is_plain_standardisation() -> None:
    nm = NoiseModel(gain=0.0, sigma=4.0, offset=100.0)
    x = np.array([[92.0, 100.0, 112.0]], dtype=np.float32)
    np.testing.assert_allclose(forward(x, nm), [[-2.0, 0.0, 3.0]], atol=1e-6)
    np.testing.assert_allclose(inverse(forward(x, nm), nm), x, atol=1e-4)
    tiny = NoiseModel(gain=1e-9, sigma=4.0, offset=100.0)
    np.testing.assert_allclose(forward(x, tiny), forward(x, nm), atol=1e-5)
    np.testing.assert_allclose(inverse(forward(x, tiny), tiny), x, atol=1e-3)


def test_nan_passes_through_and_model_is_validated() -> None:
    nm = NoiseModel(gain=1.0, sigma=2.0, offset=10.0)
    y = forward(np.array([np.nan, 10.0], dtype=np.float32), nm)
    assert np.isnan(y[0]) and abs(float(y[1])) < 0.25  # the offset maps near 0 (the 3/8 term)
    assert np.isnan(inverse(y, nm)[0])
    with pytest.raises(ValueError):
        NoiseModel(gain=-1.0, sigma=1.0, offset=0.0)
    with pytest.raises(ValueError):
        NoiseModel(gain=1.0, sigma=0.0, offset=0.0)


def _star_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sky with a gradient, a large galaxy (the level range a gain needs) and 300 stars."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    clean = 300.0 + 15.0 * xx / size
    clean += 3000.0 * np.exp(-np.hypot(xx - 0.5 * size, (yy - 0.4 * size) / 0.6) / (0.08 * size))
    s = 1.5
    for _ in range(300):
        cx, cy = rng.uniform(0, size, 2)
        flux = 10 ** rng.uniform(2, 5)
        clean += (
            flux / (2 * np.pi * s * s) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        )
    return clean


def test_estimate_recovers_gain_and_sigma() -> None:
    rng = np.random.default_rng(4)
    clean = _star_field(rng, 768)
    gain, rn = 0.5, 8.0
    img = (gain * rng.poisson(clean / gain) + rng.normal(0.0, rn, clean.shape)).astype(np.float32)
    nm = estimate_noise_model(img)
    true_sigma = np.sqrt(gain * nm.offset + rn * rn)  # variance gain*level + rn^2 at the offset
    assert abs(nm.gain - gain) < 0.1 * gain
    assert abs(nm.sigma - true_sigma) < 0.1 * true_sigma
    assert abs(nm.offset - np.median(clean)) < 0.5 * true_sigma


def test_binned_variance_keeps_bins_for_a_thousand_pairs() -> None:
    """The estimate goes on with as few as 1000 smooth pixels: bins shrink in number, not in
    size below the 50 pixels a robust variance needs (24 bins of 45 once gave none at all)."""
    rng = np.random.default_rng(6)
    level = np.linspace(100.0, 200.0, 1100)
    resid = rng.normal(0.0, 2.0, level.size)
    cen, var, cnt = _binned_variance(level, resid)
    assert cen.size == 22 and cnt.min() >= 50
    assert abs(np.sqrt(np.average(var, weights=cnt)) - 2.0) < 0.2


def test_estimate_on_flat_gaussian_frame_gives_zero_gain() -> None:
    rng = np.random.default_rng(5)
    img = rng.normal(1000.0, 7.0, (600, 600)).astype(np.float32)
    img[:50, :50] = np.nan
    mask = np.zeros(img.shape, dtype=bool)
    mask[-40:, :] = True
    img[-40:, :] = 60000.0  # a masked-out saturated band must not matter
    nm = estimate_noise_model(img, mask)
    assert nm.gain * 50.0 < 0.05 * nm.sigma**2  # no measurable slope over the sky's range
    assert abs(nm.sigma - 7.0) < 0.05 * 7.0
    assert abs(nm.offset - 1000.0) < 1.0


def test_transforms_by_blocks_equal_the_whole_array_formula() -> None:
    """forward and inverse work a block of elements at a time; the seams must not show."""
    rng = np.random.default_rng(6)
    nm = NoiseModel(gain=0.3, sigma=5.0, offset=900.0)
    x = rng.uniform(850.0, 40000.0, (517, 301)).astype(np.float32)  # 155,617 elements: 3 blocks
    x[200, 17] = np.nan
    d = x.astype(np.float64) - nm.offset
    g, s = nm.gain, nm.sigma
    expected = 2.0 * (d + 0.375 * g) / (np.sqrt(np.maximum(g * d + 0.375 * g * g + s * s, 0)) + s)
    y = forward(x, nm)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    back = inverse(y, nm)
    assert back.shape == x.shape and np.isnan(back[200, 17])
    np.testing.assert_allclose(back[np.isfinite(x)], x[np.isfinite(x)], rtol=1e-4, atol=0.2)


def test_estimate_on_a_large_frame_measures_the_sky_on_its_tiles() -> None:
    """Above 4 MP the model, the sky level included, comes from a spread grid of tiles."""
    rng = np.random.default_rng(7)
    h, w = 2100, 2050  # 4.3 MP: measured on tiles
    ramp = np.linspace(0.0, 40.0, w, dtype=np.float32)[None, :]
    img = (1000.0 + ramp + rng.normal(0.0, 6.0, (h, w))).astype(np.float32)
    nm = estimate_noise_model(img)
    assert abs(nm.offset - float(np.median(img))) < 0.1 * 6.0
    assert abs(nm.sigma - 6.0) < 0.03 * 6.0
    assert nm.gain * 40.0 < 0.05 * 36.0
