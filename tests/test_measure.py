"""Measurement against known truth: star positions and widths, background, gradient, noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from conftest import render_gaussian_stars
from subwatch.measure import estimate_background, measure_frame, measure_gradient


def _field(n: int = 250, shape: tuple[int, int] = (600, 800), seed: int = 3):
    rng = np.random.default_rng(seed)
    h, w = shape
    xy = np.column_stack([rng.uniform(15, w - 15, n), rng.uniform(15, h - 15, n)])
    flux = 3000 + rng.pareto(1.5, n) * 3000
    return xy, flux


@pytest.mark.parametrize("fwhm", [2.5, 3.5, 5.0])
def test_fwhm_and_centroids_against_truth(fwhm: float) -> None:
    xy, flux = _field()
    # Same peak SNR at every width, so the centroid bound below means the same thing.
    flux = flux * (fwhm / 2.5) ** 2
    img = render_gaussian_stars((600, 800), xy, flux, fwhm, seed=int(fwhm * 10))
    m = measure_frame(img)
    tree = cKDTree(xy)
    d, idx = tree.query(np.column_stack([m.stars.x, m.stars.y]))
    matched = d < 1.0
    assert matched.sum() >= 0.8 * len(xy)
    assert m.fwhm == pytest.approx(fwhm, rel=0.05)
    # Centroids of isolated stars (blends shift any centroid): the 30 with the best SNR.
    isolation = tree.query(xy, 2)[0][:, 1]
    isolated = matched & (isolation[idx] > 4 * fwhm)
    best = np.argsort(-m.stars.snr[isolated])[:30]
    assert np.sqrt(np.mean(d[isolated][best] ** 2)) < 0.05
    assert m.eccentricity is not None and m.eccentricity < 0.4


def test_hot_pixels_are_not_stars() -> None:
    xy, flux = _field(n=60)
    img = render_gaussian_stars((600, 800), xy, flux, 3.0)
    rng = np.random.default_rng(1)
    hot = np.column_stack([rng.integers(5, 795, 200), rng.integers(5, 595, 200)])
    img[hot[:, 1], hot[:, 0]] += 20000
    m = measure_frame(img)
    d_hot, _ = cKDTree(hot).query(np.column_stack([m.stars.x, m.stars.y]))
    assert (d_hot < 0.5).sum() <= 2
    assert len(m.stars) >= 50


def test_elongated_stars_have_high_eccentricity() -> None:
    xy, flux = _field(n=120)
    img = np.zeros((600, 800), np.float32)
    for dx in np.linspace(-6, 6, 13):  # a 12 px trail of each star along x
        img += render_gaussian_stars(
            (600, 800), xy + np.array([dx, 0.0]), flux / 13, 3.0, background=0, noise=False
        )
    img = np.random.default_rng(2).poisson(img + 1000).astype(np.float32)
    m = measure_frame(img)
    assert m.eccentricity is not None and m.eccentricity > 0.8


def test_background_noise_and_gradient() -> None:
    rng = np.random.default_rng(5)
    h, w = 768, 1024
    yy, xx = np.mgrid[0:h, 0:w]
    sky = 800 + 0.1 * xx + 0.05 * yy  # brighter towards +x, +y
    img = (sky + rng.normal(0, 12.0, (h, w))).astype(np.float32)
    bkg = estimate_background(img)
    assert bkg.noise == pytest.approx(12.0, rel=0.05)
    full = bkg.full((h, w))
    assert np.abs(full - sky)[50:-50, 50:-50].max() < 6.0
    grad = measure_gradient(bkg, (h, w))
    assert grad.amplitude == pytest.approx(0.1 * w + 0.05 * h, rel=0.08)
    assert grad.angle_deg == pytest.approx(np.degrees(np.arctan2(0.05, 0.1)), abs=3)


def test_snr_grows_with_signal() -> None:
    xy, flux = _field(n=150)
    faint = measure_frame(render_gaussian_stars((600, 800), xy, flux, 3.0, seed=1))
    bright = measure_frame(render_gaussian_stars((600, 800), xy, flux * 4, 3.0, seed=1))
    assert faint.snr is not None and bright.snr is not None
    assert bright.snr > 2.5 * faint.snr


def test_snr_falls_under_clouds() -> None:
    """Clouds erase faint stars; the SNR of the brightest must still fall, not rise."""
    xy, flux = _field(n=250)
    clear = measure_frame(render_gaussian_stars((600, 800), xy, flux, 3.0, seed=4))
    cloudy = measure_frame(
        render_gaussian_stars((600, 800), xy, flux * 0.3, 3.0, background=2000.0, seed=4)
    )
    assert cloudy.n_stars < 0.8 * clear.n_stars
    assert clear.snr is not None and cloudy.snr is not None
    assert cloudy.snr < 0.5 * clear.snr
