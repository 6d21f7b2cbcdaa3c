"""The PSF measured from a stack's stars: Moffat parameters, shape, grid, and the kernel."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from subwatch.enhance.psf import PSFModel, measure_psf, moffat_kernel, saturation_level
from subwatch.simulate.sky import render_stars

SHAPE = (768, 1024)


def star_field(
    fwhm: float,
    beta: float,
    *,
    shape: tuple[int, int] = SHAPE,
    n: int = 400,
    seed: int = 1,
    sky: float = 1000.0,
    noise: float = 10.0,
) -> np.ndarray:
    """Moffat stars (log-uniform fluxes) on a flat sky with Gaussian noise, float32 ADU."""
    rng = np.random.default_rng(seed)
    h, w = shape
    x, y = rng.uniform(5, w - 5, n), rng.uniform(5, h - 5, n)
    flux = 300.0 * 1000.0 ** rng.uniform(0, 1, n)
    img = render_stars(shape, x, y, flux, fwhm, beta, floor=0.01) + sky
    return (img + rng.normal(0, noise, shape)).astype(np.float32)


def elliptical_field(
    fwhm: float, beta: float, ellipticity: float, angle: float, *, n: int = 400, seed: int = 3
) -> np.ndarray:
    """Elliptical Moffat stars sampled at pixel centres, drawn star by star."""
    rng = np.random.default_rng(seed)
    h, w = SHAPE
    img = np.zeros(SHAPE, np.float64)
    ratio = 1.0 - ellipticity
    a, b = fwhm / math.sqrt(ratio), fwhm * math.sqrt(ratio)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    k = 4.0 * (2.0 ** (1.0 / beta) - 1.0)
    norm = (beta - 1.0) * k / (math.pi * a * b)
    r = 15
    offs = np.arange(-r, r + 1)
    for _ in range(n):
        x, y = rng.uniform(r, w - r - 1), rng.uniform(r, h - r - 1)
        flux = 300.0 * 1000.0 ** rng.uniform(0, 1)
        ix, iy = round(x), round(y)
        dy, dx = np.meshgrid(offs + iy - y, offs + ix - x, indexing="ij")
        u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
        img[iy - r : iy + r + 1, ix - r : ix + r + 1] += (
            flux * norm * (1 + k * (u * u + v * v)) ** (-beta)
        )
    img += 1000.0 + rng.normal(0, 10.0, SHAPE)
    return img.astype(np.float32)


@pytest.mark.parametrize(("fwhm", "beta"), [(2.2, 2.5), (3.0, 3.5), (4.5, 4.5)])
def test_moffat_parameters_match_the_truth(fwhm: float, beta: float) -> None:
    psf = measure_psf(star_field(fwhm, beta))
    assert psf is not None
    assert psf.fwhm == pytest.approx(fwhm, rel=0.02)
    assert psf.beta == pytest.approx(beta, rel=0.05)
    assert psf.ellipticity < 0.02
    assert psf.n_stars >= 30


def test_kernel_is_odd_normalised_float32_and_centred() -> None:
    psf = measure_psf(star_field(3.0, 3.5), size=21)
    assert psf is not None
    k = psf.kernel
    assert k.dtype == np.float32 and k.shape == (21, 21)
    assert float(k.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(k), k.shape) == (10, 10)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # point-symmetric
    # The kernel is the measured profile: its half maximum lies at FWHM / 2.
    centre_row = k[10].astype(np.float64)
    half = np.interp(0.5 * centre_row[10], centre_row[10::-1][::-1], np.arange(-10, 1))
    assert -half * 2 == pytest.approx(psf.fwhm, rel=0.05)
    with pytest.raises(ValueError, match="odd"):
        measure_psf(star_field(3.0, 3.5), size=24)


def test_elliptical_stars_give_ellipticity_and_angle() -> None:
    psf = measure_psf(elliptical_field(3.2, 3.0, 0.2, 30.0))
    assert psf is not None
    assert psf.fwhm == pytest.approx(3.2, rel=0.02)
    assert psf.beta == pytest.approx(3.0, rel=0.05)
    assert psf.ellipticity == pytest.approx(0.2, abs=0.02)
    assert psf.angle == pytest.approx(30.0, abs=3.0)
    # The kernel is elongated the same way: its second moments say so.
    k = psf.kernel.astype(np.float64)
    h = k.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    mxx, myy, mxy = (k * xx * xx).sum(), (k * yy * yy).sum(), (k * xx * yy).sum()
    assert math.degrees(0.5 * math.atan2(2 * mxy, mxx - myy)) == pytest.approx(30.0, abs=3.0)


def test_to_dict_is_json_with_the_parameters() -> None:
    psf = measure_psf(star_field(3.0, 3.5))
    assert psf is not None
    d = json.loads(json.dumps(psf.to_dict()))
    assert {"fwhm", "beta", "ellipticity", "angle", "n_stars"} <= set(d)
    assert d["fwhm"] == pytest.approx(psf.fwhm, abs=1e-3)
    assert "grid" not in d


def test_colour_is_measured_on_the_luminance() -> None:
    mono = star_field(3.0, 3.5)
    colour = np.stack([mono * 0.8, mono, mono * 1.3], axis=2)
    a, b = measure_psf(mono), measure_psf(colour)
    assert a is not None and b is not None
    assert b.fwhm == pytest.approx(a.fwhm, rel=0.01)
    assert b.beta == pytest.approx(a.beta, rel=0.03)


def test_too_few_stars_give_none() -> None:
    rng = np.random.default_rng(0)
    sky = (1000.0 + rng.normal(0, 10.0, (300, 400))).astype(np.float32)
    assert measure_psf(sky) is None
    few = sky + render_stars(
        sky.shape,
        np.array([100.0, 300.0]),
        np.array([100.0, 200.0]),
        np.array([5e4, 5e4]),
        3.0,
        3.5,
    )
    assert measure_psf(few.astype(np.float32)) is None


def varying_field(
    fwhms: tuple[float, float, float], beta: float = 3.5, seed: int = 5
) -> np.ndarray:
    """Stars whose FWHM changes from the left third of the frame to the right third."""
    rng = np.random.default_rng(seed)
    h, w = SHAPE
    img = np.full(SHAPE, 1000.0, np.float32)
    for band, fwhm in enumerate(fwhms):
        n = 300
        x = rng.uniform(band * w / 3 + 5, (band + 1) * w / 3 - 5, n)
        y = rng.uniform(5, h - 5, n)
        flux = 300.0 * 1000.0 ** rng.uniform(0, 1, n)
        img += render_stars(SHAPE, x, y, flux, fwhm, beta, floor=0.01)
    return (img + rng.normal(0, 10.0, SHAPE)).astype(np.float32)


def test_grid_follows_a_field_varying_psf() -> None:
    fwhms = (2.4, 3.2, 4.2)
    psf = measure_psf(varying_field(fwhms), grid=True)
    assert psf is not None and psf.grid is not None and psf.cells is not None
    assert len(psf.grid) == 3 and all(len(row) == 3 for row in psf.grid)
    for row in range(3):
        for col in range(3):
            cell = psf.cells[row][col]
            assert cell["source"] == "cell"
            assert cell["n_stars"] >= 5
            assert cell["fwhm"] == pytest.approx(fwhms[col], rel=0.05), (row, col)
            assert cell["beta"] == pytest.approx(3.5, rel=0.15), (row, col)
            k = psf.grid[row][col]
            assert k.shape == psf.kernel.shape and k.dtype == np.float32
            assert float(k.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
    # The whole-field fit sits between the extremes; status.json gets the grid as numbers.
    assert fwhms[0] < psf.fwhm < fwhms[2]
    d = json.loads(json.dumps(psf.to_dict()))
    assert d["grid"][1][2]["fwhm"] == pytest.approx(fwhms[2], rel=0.05)
    # Between cell centres the kernel is interpolated; at a cell centre it is that cell's.
    h, w = SHAPE
    np.testing.assert_allclose(psf.kernel_at(w / 6, h / 2, SHAPE), psf.grid[1][0], atol=1e-6)
    mid = psf.kernel_at(w / 3, h / 2, SHAPE)
    assert psf.grid[1][1].max() < mid.max() < psf.grid[1][0].max()


def test_a_single_psf_has_no_grid() -> None:
    psf = measure_psf(varying_field((2.4, 3.2, 4.2)))
    assert psf is not None and psf.grid is None
    np.testing.assert_array_equal(psf.kernel_at(10, 10, SHAPE), psf.kernel)


def test_saturated_stars_are_left_out() -> None:
    img = star_field(3.0, 3.5, n=400)
    # Clip the brightest stars at a common level, as a camera's full well does.
    level = float(np.quantile(img, 0.9995))
    clipped = np.minimum(img, level)
    found = saturation_level(clipped)
    assert found is not None and found < level
    psf = measure_psf(clipped)
    assert psf is not None
    assert psf.fwhm == pytest.approx(3.0, rel=0.02)
    assert psf.beta == pytest.approx(3.5, rel=0.05)


def test_moffat_kernel_helper() -> None:
    k = moffat_kernel(25, 3.0, 3.5)
    assert k.shape == (25, 25) and k.dtype == np.float32
    row = k[12].astype(np.float64)
    assert row[12 + 1] / row[12] > 0.5 > row[12 + 2] / row[12]  # half maximum at 1.5 px
    model = PSFModel(kernel=k, fwhm=3.0, beta=3.5, n_stars=0)
    assert model.to_dict()["size"] == 25
    with pytest.raises(ValueError):
        moffat_kernel(24, 3.0, 3.5)
