"""Measurement against known truth: star positions and widths, background, gradient, noise.

Two kinds of truth: Gaussian stars rendered here, and lights from the simulator (Moffat stars
with the night's seeing and beta, an emission nebula, vignetting, hot pixels), whose answers
the simulator writes down. Simulated lights are uncalibrated (``calibration=False``); the
tests subtract the bias pedestal and map the reference-frame star catalogue into the light
through the inverse of its transform.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from conftest import render_gaussian_stars
from subwatch.measure import estimate_background, measure_frame, measure_gradient
from subwatch.measure.frame import FrameMeasurement
from subwatch.simulate import SimOptions, Simulation


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


def test_hot_pixels_and_cosmic_rays_are_not_stars() -> None:
    xy, flux = _field(n=60)
    img = render_gaussian_stars((600, 800), xy, flux, 3.0)
    rng = np.random.default_rng(1)
    hot = np.column_stack([rng.integers(5, 795, 200), rng.integers(5, 595, 200)])
    img[hot[:, 1], hot[:, 0]] += 20000
    # Cosmic-ray tracks of two and three pixels, straight or diagonal, fading along the track.
    hits = np.column_stack([rng.integers(5, 790, 150), rng.integers(5, 590, 150)])
    steps = np.array([[1, 0], [0, 1], [1, 1], [1, -1]])[rng.integers(0, 4, 150)]
    energy = rng.uniform(2000, 30000, 150)
    length = rng.integers(2, 4, 150)
    for k, share in enumerate((0.57, 0.29, 0.14)):
        p = hits + k * steps
        img[p[:, 1], p[:, 0]] += np.where(k < length, energy * share, 0.0)
    m = measure_frame(img)
    defects = cKDTree(np.vstack([hot, hits, hits + steps]))
    assert (defects.query(np.column_stack([m.stars.x, m.stars.y]))[0] < 1.0).sum() <= 2
    assert m.detections is not None
    assert (defects.query(m.detections)[0] < 1.0).sum() <= 3
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


# ---------------------------------------------------------------------------------------------
# Against the simulator's truth


@dataclass
class SimLight:
    """One simulated light, bias subtracted, with its stars mapped into its own pixels."""

    image: np.ndarray  # ADU
    saturation: float  # ADU above bias at which cores clip
    fwhm: float  # true seeing FWHM, px
    beta: float
    x: np.ndarray  # true star positions in the light, px
    y: np.ndarray
    snr: np.ndarray  # expected PSF-weighted SNR of each star (its flux, the sky under it)
    clean: np.ndarray  # away from the edges, hot pixels and other stars' light
    sky_noise: float  # sqrt(sky_e + dark_e + read_e^2) / gain at the frame centre, ADU
    noise_map: np.ndarray  # true per-pixel noise of the star-free frame, ADU


@functools.cache
def _sim_light(
    seed: int, seeing: tuple[float, float] = (2.5, 3.5), nebula: float = 3.0, index: int = 1
) -> SimLight:
    opts = SimOptions(
        out=Path("unused"),
        lights=index + 1,
        width=800,
        height=600,
        seed=seed,
        calibration=False,
        seeing=seeing,
        nebula_peak=nebula,
    )
    sim = Simulation(opts)
    truth = sim.truth()
    light = truth["lights"][index]
    gain, bias = truth["gain"], truth["bias_adu"]
    image = sim.light_frame(index).astype(np.float32) - np.float32(bias)
    # The catalogue is in reference pixels with light 0's fluxes: map it into this light.
    cat = truth["stars"]
    ref = np.array([[s["x"], s["y"]] for s in cat])
    m = np.array(light["transform"])  # light -> reference
    a, t = m[:, :2], m[:, 2]
    xy = (ref - t) @ np.linalg.inv(a).T
    x, y = xy[:, 0], xy[:, 1]
    w, h = opts.width, opts.height
    ix = np.clip(np.rint(x).astype(int), 0, w - 1)
    iy = np.clip(np.rint(y).astype(int), 0, h - 1)
    illumination = sim.camera.illumination(sim.plans[index].label)[iy, ix]
    scale = light["transparency"] / truth["lights"][0]["transparency"]
    flux = np.array([s["flux"] for s in cat]) * scale * illumination / gain  # ADU
    dark = truth["dark_e_per_s"] * truth["exptime"]
    sky_e = sim.light_expected(index, stars=False)  # glow + nebula through the flat, e-
    noise_map = np.sqrt(sky_e + dark + truth["read_noise_e"] ** 2) / gain
    # PSF-weighted SNR: noise-equivalent area of a Moffat profile, pi a^2 (2b-1)/(b-1)^2.
    fwhm, beta = light["fwhm"], light["beta"]
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    area = np.pi * alpha**2 * (2 * beta - 1) / (beta - 1) ** 2
    snr = flux / np.sqrt(flux / gain + area * noise_map[iy, ix] ** 2)
    # Clean stars: 20 px inside the frame (the catalogue ends at the reference's edge), no
    # uncalibrated hot pixel within 6 px, no other star within 3 FWHM or adding a tenth of
    # this star's peak at its centre.
    tree = cKDTree(xy)
    nearest = tree.query(xy, 2)[0][:, 1]
    peak = flux * (beta - 1) / (np.pi * alpha**2)
    pairs = tree.query_pairs(60.0, output_type="ndarray")
    d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
    profile = (1 + d**2 / alpha**2) ** (-beta)
    others = np.zeros(len(cat))
    np.add.at(others, pairs[:, 0], peak[pairs[:, 1]] * profile)
    np.add.at(others, pairs[:, 1], peak[pairs[:, 0]] * profile)
    hot = np.asarray(truth["hot_pixels"], float).reshape(-1, 2)
    near_hot = cKDTree(hot).query(xy)[0] if len(hot) else np.full(len(cat), np.inf)
    inside = (x > 20) & (x < w - 21) & (y > 20) & (y < h - 21)
    clean = inside & (nearest > 3 * fwhm) & (others < 0.1 * peak) & (near_hot > 6)
    return SimLight(
        image=image,
        saturation=truth["full_well"] / gain - bias,
        fwhm=fwhm,
        beta=beta,
        x=x,
        y=y,
        snr=snr,
        clean=clean,
        sky_noise=float(np.sqrt(light["sky_e"] + dark + truth["read_noise_e"] ** 2) / gain),
        noise_map=noise_map,
    )


@functools.cache
def _measured(seed: int, seeing: tuple[float, float] = (2.5, 3.5), nebula: float = 3.0):
    light = _sim_light(seed, seeing, nebula)
    return light, measure_frame(light.image, saturation=light.saturation)


SEEING = [
    pytest.param(7, (2.5, 3.5), id="fwhm3"),
    pytest.param(3, (1.8, 2.2), id="undersampled"),
    pytest.param(8, (3.8, 4.2), id="soft"),
]


@pytest.mark.parametrize(("seed", "seeing"), SEEING)
def test_fwhm_and_hfr_match_the_simulated_seeing(seed: int, seeing: tuple[float, float]) -> None:
    """Moffat stars (beta 2.8-4.2): FWHM and HFR within 5 % of the simulated seeing."""
    light, m = _measured(seed, seeing)
    assert m.fwhm == pytest.approx(light.fwhm, rel=0.05)
    alpha = light.fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / light.beta) - 1.0))
    hfr = alpha * np.sqrt(2.0 ** (1.0 / (light.beta - 1.0)) - 1.0)
    assert m.hfr == pytest.approx(hfr, rel=0.05)
    fitted = m.stars.fitted
    assert fitted.sum() >= 20
    assert np.median(m.stars.beta[fitted]) == pytest.approx(light.beta, rel=0.25)
    # Every star carries a width, fitted or scaled from its moments.
    assert np.isfinite(m.stars.fwhm).all() and np.isfinite(m.stars.hfr).all()


@pytest.mark.parametrize(("seed", "seeing"), SEEING[:2])
def test_detection_is_complete_above_snr_10(seed: int, seeing: tuple[float, float]) -> None:
    light, m = _measured(seed, seeing)
    assert m.detections is not None and m.n_stars == len(m.detections)
    d = cKDTree(m.detections).query(np.column_stack([light.x, light.y]))[0]
    sample = light.clean & (light.snr > 10)
    assert sample.sum() >= 80
    assert np.mean(d[sample] < 1.5) >= 0.95


def test_centroids_of_bright_isolated_stars() -> None:
    light, m = _measured(7)
    truth = np.column_stack([light.x, light.y])
    d, k = cKDTree(truth).query(np.column_stack([m.stars.x, m.stars.y]))
    sample = (d < 1.5) & light.clean[k] & (light.snr[k] > 50) & ~m.stars.saturated
    assert sample.sum() >= 20
    assert np.sqrt(np.mean(d[sample] ** 2)) < 0.05


def test_noise_matches_the_simulated_sky() -> None:
    """Noise is the per-pixel noise of the background, unfooled by the nebula's structure.

    Without a nebula it is the sky glow's own noise. With one, the nebula's photons add to
    the noise of the pixels it covers, and the frame's noise is that of its median pixel.
    """
    light, m = _measured(5, nebula=0.0)
    assert m.background.noise == pytest.approx(light.sky_noise, rel=0.05)
    light, m = _measured(7)
    assert m.background.noise == pytest.approx(float(np.median(light.noise_map)), rel=0.05)
    assert m.background.noise < 1.1 * light.sky_noise


def test_star_list_is_capped_but_count_is_not() -> None:
    light = _sim_light(7)
    full = measure_frame(light.image, saturation=light.saturation)
    few = measure_frame(light.image, saturation=light.saturation, max_stars=40)
    assert len(few.stars) <= 40
    assert few.n_stars == pytest.approx(full.n_stars, rel=0.05)
    assert few.fwhm == pytest.approx(full.fwhm, rel=0.02)
    # The brightest stars are the ones measured, brightest first.
    assert np.all(np.diff(few.stars.flux) <= 0)
    assert few.stars.flux[0] == pytest.approx(full.stars.flux[0])


def test_background_map_and_measurement_api() -> None:
    light, m = _measured(7)
    assert isinstance(m, FrameMeasurement)
    full = m.background.full(light.image.shape)
    assert full.shape == light.image.shape and np.isfinite(full).all()
    assert m.stars.xyf(min_snr=0).shape == (len(m.stars), 3)
    # Registration gets the well-measured stars, brightest first, when there are enough.
    xyf = m.stars.xyf()
    assert 15 <= len(xyf) < len(m.stars)
    assert np.all(np.diff(xyf[:, 2]) <= 0)
    # The same stars with their positional sigma: finite and small for bright unsaturated
    # stars, larger for fainter ones.
    xyfs = m.stars.xyfs()
    assert np.array_equal(xyfs[:, :3], xyf)
    sigma = xyfs[:, 3]
    assert np.all(sigma[np.isfinite(sigma)] >= 0.01) and np.isfinite(sigma).sum() >= 15
    finite = sigma[np.isfinite(sigma)]
    assert finite[0] < 0.5 * finite.max()
    assert np.all(np.isinf(sigma) == m.stars.saturated[np.isin(m.stars.x, xyf[:, 0])])
    assert m.snr is not None and m.snr > 20
    assert m.eccentricity is not None and m.eccentricity < 0.4
