"""Regularised Richardson-Lucy: sharper stars, the same flux, no dark rings, no extra noise.

Most checks run on a synthetic field of Moffat stars with known positions and fluxes, sky-
limited noise (shot noise on the stars too), where the photometry can be exact; one runs the
whole chain on a stack the daemon made from simulated subs.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

import subwatch.enhance.deconvolve as dec
from subwatch.config import Config
from subwatch.enhance.deconvolve import Deconvolved, deconvolve
from subwatch.enhance.psf import PSFModel, measure_psf
from subwatch.measure import measure_frame
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session
from subwatch.simulate.sky import moffat_alpha, moffat_peak, render_stars

SHAPE = (768, 1024)
FWHM, BETA = 3.0, 3.5
SKY, GAIN = 1000.0, 10.0  # ADU, e-/ADU: sky noise sqrt(1000 / 10) = 10 ADU
SIGMA = 10.0


class Field:
    """A star field, its noiseless stars, and the stars' positions and fluxes."""

    def __init__(self, fwhm: float = FWHM, seed: int = 7, n: int = 700) -> None:
        rng = np.random.default_rng(seed)
        h, w = SHAPE
        self.x = rng.uniform(8, w - 8, n)
        self.y = rng.uniform(8, h - 8, n)
        self.flux = 200.0 * 20000.0 ** rng.uniform(0, 1, n)
        self.stars = render_stars(SHAPE, self.x, self.y, self.flux, fwhm, BETA, floor=0.005)
        signal = SKY + self.stars
        self.image = (signal + rng.normal(0, 1, SHAPE) * np.sqrt(signal / GAIN)).astype(np.float32)
        # Isolated: no other star within 20 px, and none whose light reaches this star's sky
        # annulus (out to 6 FWHM) at more than a fifth of the noise.
        xy = np.column_stack([self.x, self.y])
        tree = cKDTree(xy)
        alpha = moffat_alpha(fwhm, BETA)
        peak = moffat_peak(self.flux, fwhm, BETA)
        self.isolated = np.zeros(n, bool)
        margin = 40
        for i in range(n):
            if not (margin < self.x[i] < w - margin and margin < self.y[i] < h - margin):
                continue
            near = [j for j in tree.query_ball_point(xy[i], 80.0) if j != i]
            dist = np.hypot(self.x[near] - self.x[i], self.y[near] - self.y[i])
            reach = np.maximum(dist - 6 * fwhm, 0.0)
            light = peak[near] * (1 + (reach / alpha) ** 2) ** -BETA
            self.isolated[i] = bool((dist > 20).all() and (light < 0.2 * SIGMA).all())

    def star_free(self) -> np.ndarray:
        """Pixels where no star adds a tenth of the noise, a few pixels from any that does."""
        free = (self.stars < 0.1 * SIGMA).astype(np.uint8)
        return cv2.erode(free, np.ones((7, 7), np.uint8)).astype(bool)


def aperture_flux(img: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float) -> np.ndarray:
    """Flux within 3 FWHM, minus the median sky between 4 and 6 FWHM."""
    out = []
    r_out = int(np.ceil(6 * fwhm)) + 1
    for xi, yi in zip(x, y, strict=True):
        ix, iy = round(xi), round(yi)
        sub = img[iy - r_out : iy + r_out + 1, ix - r_out : ix + r_out + 1].astype(np.float64)
        oy, ox = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
        rr = np.hypot(ox - (xi - ix), oy - (yi - iy))
        sky = np.median(sub[(rr >= 4 * fwhm) & (rr < 6 * fwhm)])
        out.append((sub[rr <= 3 * fwhm] - sky).sum())
    return np.array(out)


def ring_depth(img: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float) -> np.ndarray:
    """Deepest 1-px annulus median between 1 and 6 FWHM below the sky around it, in sigmas.

    The sky is the median between 6 FWHM and the stamp's edge. An annulus median averages
    most of the noise away, so a systematic dip (a ring) shows at a fraction of a sigma, and
    a faint neighbour in the annulus does not pull it up.
    """
    depths = []
    r_out = int(np.ceil(6 * fwhm)) + 8
    for xi, yi in zip(x, y, strict=True):
        ix, iy = round(xi), round(yi)
        sub = img[iy - r_out : iy + r_out + 1, ix - r_out : ix + r_out + 1].astype(np.float64)
        oy, ox = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
        rr = np.hypot(ox - (xi - ix), oy - (yi - iy))
        sky = np.median(sub[rr >= 6 * fwhm])
        profile = [
            np.median(sub[(rr >= a) & (rr < a + 1)]) - sky for a in np.arange(fwhm, 6 * fwhm)
        ]
        depths.append(-min(profile) / SIGMA)
    return np.array(depths)


@pytest.fixture(scope="module")
def field() -> Field:
    return Field()


@pytest.fixture(scope="module")
def psf(field: Field) -> PSFModel:
    found = measure_psf(field.image)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def result(field: Field, psf: PSFModel) -> Deconvolved:
    return deconvolve(field.image, psf)


def test_output_is_linear_float32_of_the_same_shape(field: Field, result: Deconvolved) -> None:
    assert result.image.dtype == np.float32 and result.image.shape == field.image.shape
    assert np.isfinite(result.image).all()
    assert 1 <= result.iterations <= 30
    assert result.seconds > 0
    # Linear: the sky stays where it was, and flux is neither made nor lost overall.
    free = field.star_free()
    sky_in, sky_out = np.median(field.image[free]), np.median(result.image[free])
    assert float(sky_out) == pytest.approx(float(sky_in), abs=0.05 * SIGMA)
    total_in = float((field.image - SKY).sum(dtype=np.float64))
    total_out = float((result.image - SKY).sum(dtype=np.float64))
    assert total_out == pytest.approx(total_in, rel=0.01)


def test_median_fwhm_drops_by_a_quarter(field: Field, result: Deconvolved) -> None:
    before = measure_frame(field.image).fwhm
    after = measure_frame(result.image).fwhm
    assert before == pytest.approx(FWHM, rel=0.02)
    assert after <= 0.75 * before
    assert after >= 0.5 * before  # towards the target PSF, not to single pixels


def test_star_flux_is_kept_in_apertures(field: Field, result: Deconvolved) -> None:
    sel = field.isolated
    before = aperture_flux(field.image, field.x[sel], field.y[sel], FWHM)
    after = aperture_flux(result.image, field.x[sel], field.y[sel], FWHM)
    snr = before / (SIGMA * np.sqrt(np.pi * (3 * FWHM) ** 2))
    ratio = after / before
    bright = snr >= 50
    assert bright.sum() >= 30
    assert np.abs(ratio[bright] - 1).max() < 0.03
    assert np.median(ratio[(snr >= 20) & (snr < 50)]) == pytest.approx(1.0, abs=0.03)


def test_no_dark_rings_around_bright_stars(field: Field, result: Deconvolved) -> None:
    sel = field.isolated & (field.flux > np.quantile(field.flux[field.isolated], 0.8))
    assert sel.sum() >= 10
    depth = ring_depth(result.image, field.x[sel], field.y[sel], FWHM)
    assert depth.max() < 3.0
    # The brightest of them are thousands of sigma at the peak: the floor is what holds.
    assert (
        field.stars[np.rint(field.y[sel]).astype(int), np.rint(field.x[sel]).astype(int)].max()
        > 1e4 * SIGMA
    )


def test_saturated_stars_neither_ring_nor_lose_flux(field: Field) -> None:
    """Clipped cores do not fit any PSF: the worst case for ringing."""
    level = 40000.0
    clipped = np.minimum(field.image, np.float32(level))
    psf = measure_psf(clipped)
    assert psf is not None and psf.fwhm == pytest.approx(FWHM, rel=0.02)
    peak = field.stars[np.rint(field.y).astype(int), np.rint(field.x).astype(int)]
    sat = field.isolated & (peak > level)
    assert sat.sum() >= 8
    out = deconvolve(clipped, psf).image
    assert ring_depth(out, field.x[sat], field.y[sat], FWHM).max() < 3.0
    before = aperture_flux(clipped, field.x[sat], field.y[sat], FWHM)
    after = aperture_flux(out, field.x[sat], field.y[sat], FWHM)
    assert np.abs(after / before - 1).max() < 0.03


def test_rings_appear_without_the_protections(
    field: Field, psf: PSFModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ring measure is not blind: without the floor and with a thin pedestal it sees them."""
    monkeypatch.setattr(dec, "FLOOR_SIGMA", 1e6)
    monkeypatch.setattr(dec, "PEDESTAL", 5.0)
    plain = deconvolve(field.image, psf, regularization=0.0)
    sel = field.isolated & (field.flux > np.quantile(field.flux[field.isolated], 0.8))
    assert ring_depth(plain.image, field.x[sel], field.y[sel], FWHM).max() > 3.0


def test_tiles_meet_without_seams(
    field: Field, psf: PSFModel, result: Deconvolved, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tiling puts the tile boundaries elsewhere; the result must not change."""
    monkeypatch.setattr(dec, "TILE", 400)
    other = deconvolve(field.image, psf)
    signal = np.abs(result.image - SKY) + SIGMA
    assert (np.abs(other.image - result.image) / signal).max() < 0.01


@pytest.mark.parametrize("shape", [(512, 512), (75, 81), (64, 125), (81, 64), (125, 75)])
def test_real_transfer_function_convolves_as_the_complex_product(shape: tuple[int, int]) -> None:
    """A point-symmetric kernel's spectrum is multiplied slot by slot by a real factor; the
    result must be the complex product's for every packed layout (odd and even sides), in
    both directions."""
    from subwatch.enhance.psf import moffat_kernel

    kernel = moffat_kernel(25, 2.9, 3.8, ellipticity=0.3, angle=37.0)
    transfer = dec._otf(kernel, shape)
    assert transfer.real
    pad = np.zeros(shape, np.float32)
    pad[:25, :25] = kernel
    packed = cv2.dft(np.roll(pad, (-12, -12), axis=(0, 1))) / np.float32(shape[0] * shape[1])
    image = np.random.default_rng(4).normal(100.0, 10.0, shape).astype(np.float32)
    for adjoint in (False, True):
        spectrum = cv2.mulSpectrums(cv2.dft(image), packed, 0, conjB=adjoint)
        expected = cv2.idft(spectrum, flags=cv2.DFT_REAL_OUTPUT)
        got = dec._convolve(image, transfer, adjoint)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    lopsided = kernel.copy()
    lopsided[0, 0] += 0.01
    assert not dec._otf(lopsided, shape).real


@pytest.mark.parametrize("shape", [(512, 512), (75, 81), (64, 125)])
def test_two_tiles_convolved_in_one_complex_transform(shape: tuple[int, int]) -> None:
    """``a + ib`` through one complex transform gives both real convolutions, either way."""
    from subwatch.enhance.psf import moffat_kernel

    kernel = moffat_kernel(25, 2.9, 3.8, ellipticity=0.3, angle=37.0)
    transfer = dec._otf(kernel, shape, paired=True)
    assert transfer.full is not None and transfer.full.shape == (*shape, 2)
    rng = np.random.default_rng(5)
    a, b = (rng.normal(100.0, 10.0, shape).astype(np.float32) for _ in range(2))
    buffers = (np.empty((*shape, 2), np.float32), np.empty((*shape, 2), np.float32))
    out_a, out_b = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    dec._convolve_pair(a, b, transfer, buffers, out_a, out_b)
    for got, image in ((out_a, a), (out_b, b)):
        expected = dec._convolve(image, transfer)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    dec._convolve_pair(a, b, transfer, buffers, a, b)  # in place, as the iterations do
    np.testing.assert_array_equal(a, out_a)
    np.testing.assert_array_equal(b, out_b)


def test_paired_tiles_deconvolve_as_single_ones(
    field: Field, psf: PSFModel, result: Deconvolved, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiles stepped two by two (one PSF for the image) end where tiles stepped one by one
    do, including tiles that stop on their own (noise level) while their partner goes on."""
    assert any(isinstance(s, dec._TilePair) for s in _steppers_used(field, psf, monkeypatch))
    monkeypatch.setattr(dec, "_steppers", lambda runs: list(runs))
    single = deconvolve(field.image, psf)
    assert single.iterations == result.iterations and single.tiles == result.tiles
    # Rounding differs (complex against real transforms) and the iterations carry it: scaling
    # the input by 1 + 1e-7 moves the result by up to 5e-4 of (signal + noise) as well.
    signal = np.abs(result.image - SKY) + SIGMA
    assert (np.abs(single.image - result.image) / signal).max() < 2e-3


def test_tiles_started_on_threads_share_one_transfer_function(psf: PSFModel) -> None:
    """Tiles start two at a time; with one PSF each must get the same transfer function, or
    none of them pair up (a race that a loaded machine hit)."""
    from concurrent.futures import ThreadPoolExecutor

    kernels = dec._Kernels(psf, (2000, 3000))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: kernels.otf(100.0 * i, 50.0, (512, 512)), range(32)))
    assert len({id(t) for t in got}) == 1
    assert got[0].real and got[0].full is not None


def test_a_paired_tile_that_stops_leaves_its_partner_going() -> None:
    """One tile explained to the noise at once (a faint star), one with bright stars: paired,
    each ends exactly as it does alone."""
    rng = np.random.default_rng(8)
    n, sigma = 128, 5.0
    kernel = dec.gaussian_kernel(25, 3.0)
    yy, xx = np.mgrid[0:n, 0:n]

    def tile(stars: list[tuple[float, float, float]]) -> np.ndarray:
        image = 30.0 * sigma + rng.normal(0.0, sigma, (n, n))
        for x, y, peak in stars:
            image += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.8**2))
        return image.astype(np.float32)

    bright = tile([(40.0, 50.0, 4000.0), (90.0, 70.0, 1500.0), (64.0, 100.0, 800.0)])
    faint = tile([(64.0, 64.0, 9.0 * sigma)])
    setup = dec._Setup(sigma, 30.0 * sigma, 3.0, 0.002, 10, 0.0, 24)
    otf = dec._otf(kernel, (n, n), paired=True)

    def runs() -> tuple[dec._TileRun, dec._TileRun]:
        return dec._TileRun(bright.copy(), otf, setup), dec._TileRun(faint.copy(), otf, setup)

    pair = dec._steppers(list(runs()))
    assert len(pair) == 1 and isinstance(pair[0], dec._TilePair)
    alone = runs()
    for _ in range(6):
        pair[0].step()
        for run in alone:
            run.step()
    for together, single in zip(pair[0].members, alone, strict=True):
        assert (together.stopped, together.done) == (single.stopped, single.done)
        np.testing.assert_allclose(together.previous, single.previous, rtol=1e-4, atol=1e-3)
    assert alone[1].stopped == "noise level" and alone[0].stopped is None
    assert alone[0].done == 6


def _steppers_used(field: Field, psf: PSFModel, monkeypatch: pytest.MonkeyPatch) -> list:
    made: list = []
    original = dec._steppers

    def spy(runs: list) -> list:
        out = original(runs)
        made.extend(out)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(dec, "_steppers", spy)
        deconvolve(field.image[:700, :900], psf, max_iterations=2)
    return made


def test_background_noise_is_not_amplified(field: Field, result: Deconvolved) -> None:
    free = field.star_free()
    assert free.mean() > 0.2
    truth = SKY + field.stars
    ratio = np.std((result.image - truth)[free]) / np.std((field.image - truth)[free])
    assert ratio <= 1.2


def test_stops_on_convergence_before_the_iteration_cap(psf: PSFModel) -> None:
    """With (almost) no noise RL converges to the target, and the relative change says so."""
    f = Field(seed=11, n=200)
    clean = (SKY + f.stars + np.random.default_rng(0).normal(0, 0.5, SHAPE)).astype(np.float32)
    done = deconvolve(clean, psf, max_iterations=200, noise=0.5)
    assert done.stopped == "converged"
    assert done.iterations < 200
    capped = deconvolve(clean, psf, max_iterations=3, noise=0.5)
    assert capped.iterations == 3 and capped.stopped == "max_iterations"


def test_an_empty_sky_is_left_alone(psf: PSFModel) -> None:
    rng = np.random.default_rng(2)
    sky = (SKY + rng.normal(0, SIGMA, (300, 400))).astype(np.float32)
    out = deconvolve(sky, psf)
    # No tile has signal above the mask's threshold, or what little it has (noise peaks) is
    # already explained to the noise level before a single iteration.
    assert out.iterations == 0
    assert set(out.tiles) <= {"no signal", "noise level"}
    np.testing.assert_allclose(out.image, sky, atol=1e-3)


def test_colour_is_deconvolved_per_channel(psf: PSFModel) -> None:
    f = Field(seed=3, n=300)
    scales = (0.7, 1.0, 1.6)
    colour = np.stack([f.image * s for s in scales], axis=2)
    mono = deconvolve(f.image, psf)
    out = deconvolve(colour, psf)
    assert out.image.shape == colour.shape and out.image.dtype == np.float32
    for c, s in enumerate(scales):
        # Every threshold is in units of the channel's own noise: scaling commutes (up to
        # float rounding, which can move a tile's stop by an iteration).
        diff = np.abs(out.image[:, :, c] - mono.image * s)
        assert np.quantile(diff, 0.999) < 0.01 * SIGMA * s
        assert diff.max() < 0.5 * SIGMA * s


def test_nan_pixels_stay_nan_and_do_not_spread(field: Field, psf: PSFModel) -> None:
    img = field.image.copy()
    img[:, :20] = np.nan  # an uncovered edge of a dithered stack
    out = deconvolve(img, psf, max_iterations=5)
    assert np.isnan(out.image[:, :20]).all()
    assert np.isfinite(out.image[:, 20:]).all()


def test_background_and_noise_can_be_given(field: Field, psf: PSFModel) -> None:
    given = deconvolve(field.image, psf, background=SKY, noise=SIGMA, max_iterations=8)
    as_map = deconvolve(
        field.image, psf, background=np.full(SHAPE, SKY, np.float32), noise=SIGMA, max_iterations=8
    )
    np.testing.assert_allclose(given.image, as_map.image, rtol=1e-5, atol=1e-3 * SIGMA)
    with pytest.raises(ValueError, match="height and width"):
        deconvolve(field.image, psf, background=np.zeros((10, 10), np.float32))


def test_grid_psf_deconvolves_a_field_varying_psf() -> None:
    """Stars of 2.4 px on the left, 4.2 px on the right: both sides shrink by a quarter."""
    rng = np.random.default_rng(5)
    h, w = SHAPE
    stars = np.zeros(SHAPE, np.float32)
    fwhms = (2.4, 3.2, 4.2)
    for band, fw in enumerate(fwhms):
        n = 250
        x = rng.uniform(band * w / 3 + 8, (band + 1) * w / 3 - 8, n)
        y = rng.uniform(8, h - 8, n)
        stars += render_stars(SHAPE, x, y, 300.0 * 3000.0 ** rng.uniform(0, 1, n), fw, BETA)
    signal = SKY + stars
    img = (signal + rng.normal(0, 1, SHAPE) * np.sqrt(signal / GAIN)).astype(np.float32)
    psf = measure_psf(img, grid=True)
    assert psf is not None and psf.grid is not None
    out = deconvolve(img, psf).image
    third = w // 3
    for band in (0, 2):
        cols = slice(band * third + 16, (band + 1) * third - 16)
        before = measure_frame(np.ascontiguousarray(img[:, cols])).fwhm
        after = measure_frame(np.ascontiguousarray(out[:, cols])).fwhm
        assert before == pytest.approx(fwhms[band], rel=0.05)
        assert after <= 0.75 * before, band


# --------------------------------------------------------------------------- simulated stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict, np.ndarray]:
    """A stack of five simulated subs (a faint nebula), the truth, and the true sky without
    stars (glow and nebula, ADU)."""
    root = tmp_path_factory.mktemp("deconv")
    truth = simulate_session(
        SimOptions(
            out=root / "capture",
            lights=5,
            width=640,
            height=480,
            seed=21,
            seeing=(3.0, 3.0),
            nebula_peak=0.3,
        )
    )
    cfg = Config.model_validate(
        {"watch": {"path": str(root / "capture")}, "output": {"path": str(root / "out")}}
    )
    run_daemon(cfg, once=True)
    rows = [json.loads(x) for x in (root / "out" / "frames.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["kind"] == "light" and r["status"] == "stacked")
    data = fits.getdata(root / "out" / row["target"] / row["filter"] / "stack.fits")
    sky = fits.getdata(root / "capture" / "truth_sky.fits").astype(np.float32) / truth["gain"]
    return data.astype(np.float32), truth, sky


@pytest.mark.slow
def test_simulated_stack(stack: tuple[np.ndarray, dict, np.ndarray]) -> None:
    image, truth, true_sky = stack
    light = truth["lights"][0]
    fwhm, beta = light["fwhm"], light["beta"]
    psf = measure_psf(image)
    assert psf is not None
    # The stack's PSF is the subs' seeing, widened a little by the registration's
    # interpolation (which also lifts the fitted beta: the core widens, the wings do not).
    assert psf.fwhm == pytest.approx(fwhm, rel=0.05)
    assert psf.beta == pytest.approx(beta, rel=0.25)
    out = deconvolve(image, psf)
    before, after = measure_frame(image), measure_frame(out.image)
    assert after.fwhm <= 0.75 * before.fwhm
    sigma = before.background.noise

    stars = truth["stars"]
    x = np.array([s["x"] for s in stars])
    y = np.array([s["y"] for s in stars])
    flux = np.array([s["flux"] for s in stars]) / truth["gain"]
    star_img = render_stars(image.shape, x, y, flux, fwhm, beta, 0.01)
    true_sky -= star_img
    # Star-free sky: noise not amplified.
    free = cv2.erode((star_img < 0.1 * sigma).astype(np.uint8), np.ones((7, 7), np.uint8))
    free = free.astype(bool)
    assert free.mean() > 0.3
    assert np.std(out.image[free]) <= 1.2 * np.std(image[free])
    # No dark rings around the brightest stars where no comparable star is near and the
    # nebula is flat.
    h, w = image.shape
    peak = moffat_peak(flux, fwhm, beta)
    tree = cKDTree(np.column_stack([x, y]))
    bright = []
    for i in np.flatnonzero(
        (peak > 100 * sigma) & (x > 40) & (x < w - 40) & (y > 40) & (y < h - 40)
    ):
        near = [j for j in tree.query_ball_point([x[i], y[i]], 30.0) if j != i]
        ix, iy = round(x[i]), round(y[i])
        flat = float(np.std(true_sky[iy - 25 : iy + 26, ix - 25 : ix + 26])) < 2 * sigma
        if flat and all(peak[j] < 0.05 * peak[i] for j in near):
            bright.append(i)
    assert len(bright) >= 3
    assert peak[bright].max() > 1000 * sigma
    depth = ring_depth(out.image, x[bright], y[bright], fwhm) * SIGMA / sigma
    assert depth.max() < 3.0
