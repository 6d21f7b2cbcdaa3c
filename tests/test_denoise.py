"""The learned denoiser's machinery (tiles, normalisation, blending, cores, colour, NaN) and,
when it ships, the model itself.

The machinery is tested with tiny ONNX graphs built here with ``onnx.helper`` (box filters,
optionally squashed by a tanh so the output depends on absolute levels the way a real
network's does), so no training framework is needed; the shipped model's tests skip when
this install has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from preview_standins import moffat_stack
from subwatch.enhance import denoise as dn
from subwatch.enhance.previews import PreviewOptions, StackSnapshot, make_previews
from subwatch.enhance.vst import NoiseModel

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SKY, NOISE = 500.0, 10.0
NM = NoiseModel(gain=0.0, sigma=NOISE, offset=SKY)  # Gaussian noise: the GAT is linear


def box_model(
    path: Path, *, size: int = 3, layers: int = 2, squash: float | None = None, multiple_of: int = 4
) -> Path:
    """A graph of ``layers`` box filters of ``size`` on channel 0 (channel 1 ignored), with
    ``squash * tanh(x / squash)`` between them when given: a smoothing "denoiser" whose
    receptive field is ``layers * (size - 1) + 1``."""
    w0 = np.zeros((1, 2, size, size), np.float32)
    w0[0, 0] = 1.0 / size**2
    w1 = np.full((1, 1, size, size), 1.0 / size**2, np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")]
    pads = [size // 2] * 4
    nodes = [helper.make_node("Conv", ["input", "w0"], ["h0"], pads=pads)]
    last = "h0"
    for i in range(1, layers):
        if squash is not None:
            inits.append(numpy_helper.from_array(np.array(squash, np.float32), f"s{i}"))
            nodes += [
                helper.make_node("Div", [last, f"s{i}"], [f"d{i}"]),
                helper.make_node("Tanh", [f"d{i}"], [f"t{i}"]),
                helper.make_node("Mul", [f"t{i}", f"s{i}"], [f"m{i}"]),
            ]
            last = f"m{i}"
        nodes.append(helper.make_node("Conv", [last, "w1"], [f"h{i}"], pads=pads))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["output"]))
    graph = helper.make_graph(
        nodes,
        "box",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rf = layers * (size - 1) + 1
    helper.set_model_props(model, {"multiple_of": str(multiple_of), "receptive_field": str(rf)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _denoiser(path: Path, **settings: object) -> dn.Denoiser:
    return dn.Denoiser(dn.load_network(path, threads=1), dn.DenoiseSettings(**settings))


def _sky(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (SKY + NOISE * rng.standard_normal(shape)).astype(np.float32)


def _star(image: np.ndarray, y: float, x: float, peak: float, fwhm: float = 3.0) -> None:
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    g = peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (fwhm / 2.3548) ** 2))
    if image.ndim == 3:
        g = g[:, :, None]
    image += g.astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "box": box_model(root / "box.onnx", size=3, layers=2),
        "squash": box_model(root / "squash.onnx", size=3, layers=3, squash=2.0),
        "wide": box_model(root / "wide.onnx", size=5, layers=3, multiple_of=8),
    }


# -- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [64, 65, 200, 517, 1000])
def test_tile_weights_add_up_to_one(length: int) -> None:
    length = dn._round_up(length, 8)
    total = np.zeros(length)
    tiles = dn.axis_tiles(length, 128, 40, 8, multiple=8)
    for start, weight in tiles:
        assert start % 8 == 0 and weight.size % 8 == 0 and weight.size <= 128
        assert weight.size == tiles[0][1].size
        total[start : start + weight.size] += weight
    assert np.allclose(total, 1.0, atol=1e-6)
    if len(tiles) > 1:  # each tile gives up its guard where a neighbour takes over
        assert tiles[0][1][-8:].max() == 0.0 and tiles[1][1][:8].max() == 0.0


def test_tiles_give_the_one_tile_result(models: dict[str, Path]) -> None:
    """No seams: with the guard as wide as the network's reach, tiling changes nothing."""
    image = _sky((203, 157))
    for y, x in ((30, 40), (100, 61), (150, 120)):
        _star(image, y, x, 3000.0)
    tiled = _denoiser(models["squash"], tile=64, overlap=16)
    whole = _denoiser(models["squash"], tile=4096, overlap=16)
    a = tiled(image, 1.0, NM)
    assert tiled.info["tiles"] > 9
    b = whole(image, 1.0, NM)
    assert whole.info["tiles"] == 1
    # Float rounding only (convolutions of other sizes sum in another order): a thousandth of
    # the noise; tile-edge padding inside the guard would cost whole noise units.
    assert np.abs(a - b).max() < 1e-3 * NOISE
    assert a.std() < image.std()  # and it did smooth


def test_normalisation_is_for_the_whole_image(models: dict[str, Path]) -> None:
    """Swapping a bright block with a far sky block keeps every whole-image statistic, but
    changes those of the tiles holding them: outside the two blocks (and the network's reach
    around them) nothing may change, in the rest of those tiles too."""
    image = _sky((192, 192), seed=3)
    image[20:60, 20:60] += 40.0 * NOISE  # a bright patch of nebula, in the first tile
    swapped = image.copy()
    a, b = (slice(20, 60), slice(20, 60)), (slice(130, 170), slice(130, 170))
    swapped[a], swapped[b] = image[b], image[a]
    denoiser = _denoiser(models["squash"], tile=96, overlap=24)
    out1 = denoiser(image, 1.0, NM)
    out2 = denoiser(swapped, 1.0, NM)
    far = np.ones(image.shape, bool)
    reach = 10  # the network's 3 px, and the star-core mask's 3x3 mean, growth and feather
    for rows, cols in (a, b):
        far[rows.start - reach : rows.stop + reach, cols.start - reach : cols.stop + reach] = False
    assert far[:96, :96].sum() > 4000  # much of the first tile is compared
    assert np.abs(out1 - out2)[far].max() < 1e-3 * NOISE  # float rounding only


# -- blending, cores, no data ---------------------------------------------------------------


def test_strength_zero_is_the_input_and_strength_blends_linearly(
    models: dict[str, Path],
) -> None:
    image = _sky((80, 90))
    image[5:9, :] = np.nan
    denoiser = _denoiser(models["box"], tile=64, overlap=16)
    assert np.array_equal(denoiser(image, 0.0), image, equal_nan=True)
    full = denoiser(image, 1.0, NM)
    half = denoiser(image, 0.5, NM)
    ok = np.isfinite(image)
    assert np.allclose(half[ok], 0.5 * full[ok] + 0.5 * image[ok], atol=1e-3)
    with pytest.raises(ValueError, match="strength"):
        denoiser(image, 1.5)


def test_a_strength_change_only_reblends(models: dict[str, Path], monkeypatch) -> None:
    image = _sky((70, 70), seed=5)
    denoiser = _denoiser(models["box"], tile=64, overlap=16)
    denoiser(image, 1.0, NM)
    calls = []
    monkeypatch.setattr(denoiser.network, "run", lambda batch: calls.append(batch) or batch)
    again = denoiser(image, 0.3, NM)
    assert calls == [] and denoiser.info["cached"]
    assert again.shape == image.shape
    denoiser(image + 1.0, 0.3, NM)  # another image: the network runs
    assert calls


def test_bright_star_cores_pass_through(models: dict[str, Path]) -> None:
    image = _sky((96, 96), seed=7)
    _star(image, 48.3, 47.6, 2000.0 * NOISE)
    out = _denoiser(models["squash"], tile=64, overlap=16)(image, 1.0, NM)
    core = (slice(47, 50), slice(46, 49))  # the brightest 3x3 pixels
    assert np.array_equal(out[core], image[core])
    sky = (slice(70, 96), slice(0, 30))
    assert out[sky].std() < 0.5 * image[sky].std()  # the sky is smoothed
    wing = (48, 53)  # 5 px out: faint, denoised
    assert out[wing] != image[wing]


def test_a_wide_saturated_core_passes_through(models: dict[str, Path]) -> None:
    """A bright star's flat, saturated top is tens of pixels wide: still a core, kept."""
    image = _sky((200, 200), seed=13)
    _star(image, 100.0, 100.0, 5000.0 * NOISE, fwhm=40.0)
    np.minimum(image, SKY + 2000.0 * NOISE, out=image)  # a plateau about 46 px across
    out = _denoiser(models["box"], tile=4096, overlap=16)(image, 1.0, NM)
    top = (slice(85, 116), slice(85, 116))
    assert (image[top] == SKY + 2000.0 * NOISE).all()
    assert np.array_equal(out[top], image[top])


def test_a_top_wider_than_the_background_square_passes_through_by_its_level(
    models: dict[str, Path],
) -> None:
    """So far above the sky the network is outside its training: kept whatever its size."""
    image = _sky((300, 300), seed=17)
    _star(image, 150.0, 150.0, 10000.0 * NOISE, fwhm=120.0)
    np.minimum(image, SKY + 3000.0 * NOISE, out=image)  # about 150 px across
    out = _denoiser(models["box"], tile=4096, overlap=16)(image, 1.0, NM)
    top = (slice(100, 201), slice(100, 201))
    assert (image[top] == SKY + 3000.0 * NOISE).all()
    assert np.array_equal(out[top], image[top])


def test_bright_nebula_is_denoised_and_only_star_cores_are_kept(models: dict[str, Path]) -> None:
    """A deep stack's nebula stands tens of noise units above the sky over whole regions: it is
    no core, so its noise goes; the star on it still passes through bit for bit."""
    yy, xx = np.mgrid[0:128, 0:128]
    clean = SKY + 80.0 * NOISE * np.exp(-((yy - 64.0) ** 2 + (xx - 64.0) ** 2) / (2 * 30.0**2))
    image = (clean + NOISE * np.random.default_rng(11).standard_normal(clean.shape)).astype(
        np.float32
    )
    _star(image, 64.3, 63.6, 2000.0 * NOISE)
    out = _denoiser(models["box"], tile=4096, overlap=16)(image, 1.0, NM)
    core = (slice(63, 66), slice(62, 65))
    assert np.array_equal(out[core], image[core])
    nebula = (slice(40, 52), slice(40, 52))  # 40-60 noise units above the sky, no star
    assert (clean[nebula] - SKY).min() > 40.0 * NOISE
    assert np.std(out[nebula] - clean[nebula]) < 0.5 * NOISE


def test_no_data_stays_no_data(models: dict[str, Path]) -> None:
    image = _sky((100, 120), seed=9)
    image[:, :11] = np.nan
    image[40:45, 60:70] = np.nan
    out = _denoiser(models["box"], tile=64, overlap=16)(image, 1.0)  # noise model measured
    assert np.array_equal(np.isnan(out), np.isnan(image))
    assert np.isfinite(out[:, 11:][np.isfinite(image[:, 11:])]).all()
    assert abs(float(np.nanmedian(out)) - SKY) < 1.0


@pytest.mark.parametrize("shape", [(101, 77), (13, 9), (64, 64), (257, 31)])
def test_any_size(models: dict[str, Path], shape: tuple[int, int]) -> None:
    image = _sky(shape, seed=shape[0])
    out = _denoiser(models["wide"], tile=64, overlap=20)(image, 1.0, NM)
    assert out.shape == shape and np.isfinite(out).all()
    assert out.std() < image.std()


def test_colour_luminance_and_chroma(models: dict[str, Path]) -> None:
    shape = (120, 110)
    image = np.stack([_sky(shape, seed=s) for s in (1, 2, 3)], axis=2)
    image *= np.array([1.0, 1.1, 0.9], np.float32)
    star = np.zeros((*shape, 1), np.float32)
    _star(star, 60.0, 55.0, 3000.0 * NOISE)
    image += star * np.array([1.0, 0.6, 0.3], np.float32)  # an orange star
    image[:4] = np.nan
    out = _denoiser(models["box"], tile=64, overlap=16)(image, 1.0)
    assert out.shape == image.shape
    assert np.isnan(out[:4]).all() and np.isfinite(out[4:]).all()
    sky = (slice(80, 120), slice(0, 40))
    chroma_in = image[sky][:, :, 0] - image[sky][:, :, 2]
    chroma_out = out[sky][:, :, 0] - out[sky][:, :, 2]
    assert chroma_out.std() < 0.5 * chroma_in.std()  # colour noise smoothed
    np.testing.assert_allclose(out[60, 55], image[60, 55], rtol=1e-5)  # the core kept, colour too


# -- loading, and the preview cycle ---------------------------------------------------------


def test_missing_or_corrupt_models_are_reasons(tmp_path: Path) -> None:
    denoiser, why = dn.load_denoiser(dn.DenoiseSettings(model=str(tmp_path / "none.onnx")))
    assert denoiser is None and "not found" in why
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    denoiser, why = dn.load_denoiser(dn.DenoiseSettings(model=str(bad)))
    assert denoiser is None and why.startswith(f"denoiser model {bad} could not be loaded")


def test_a_corrupt_model_still_gives_the_other_previews(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    opts = PreviewOptions(denoise_model=str(bad), products=("preview", "denoised"))
    status = make_previews(StackSnapshot(moffat_stack((120, 160), seed=1)), tmp_path, opts).status
    assert (tmp_path / "preview.png").is_file()
    assert not (tmp_path / "denoised.png").exists()
    assert "could not be loaded" in status["preview"]["skipped"]["denoised"]
    json.dumps(status)


def test_the_cycle_denoises_the_deconvolved_image(tmp_path: Path, models: dict[str, Path]) -> None:
    image = moffat_stack((180, 240), seed=2)
    image[:, :6] = np.nan
    opts = PreviewOptions(denoise_model=str(models["box"]), denoise_tile=128, denoise_overlap=16)
    status = make_previews(StackSnapshot(image, "M1", "L"), tmp_path, opts).status
    info = status["preview"]["denoise"]
    assert info["input"] == "deconvolved" and info["tiles"] >= 2
    products = status["preview"]["products"]
    assert products.index("deconvolved.fits") < products.index("denoised.png")
    data = fits.getdata(tmp_path / "denoised.fits")
    assert data.shape == image.shape
    assert np.isnan(data[:, :6]).all() and np.isfinite(data[:, 6:]).all()
    deconvolved = fits.getdata(tmp_path / "deconvolved.fits")
    sky = (slice(140, 180), slice(10, 60))
    assert np.nanstd(data[sky]) < np.nanstd(deconvolved[sky])
    json.dumps(status)


def test_the_gradient_free_image_when_not_deconvolving(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    opts = PreviewOptions(denoise_model=str(models["box"]), products=("preview", "denoised"))
    status = make_previews(StackSnapshot(moffat_stack((120, 160), seed=4)), tmp_path, opts).status
    assert status["preview"]["denoise"]["input"] == "gradient-free"
    assert (tmp_path / "denoised.png").is_file()


# -- the shipped model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dn.Denoiser:
    denoiser, why = dn.load_denoiser(dn.DenoiseSettings(strength=1.0))
    if denoiser is None:
        pytest.skip(f"no shipped model: {why}")
    return denoiser


def _simulated_stack(subs: int, seed: int) -> tuple[np.ndarray, np.ndarray, list, float]:
    """A simulated stack of ``subs`` subs (ADU = e- per sub), its truth, its stars (x, y,
    flux) and FWHM, from subwatch's own sky simulator."""
    from subwatch.simulate import SimOptions, Simulation

    opts = SimOptions(out=Path("unused"), width=480, height=384, seed=seed, calibration=False)
    sim = Simulation(opts)
    truth = sim.light_signal(0, transients=False)[0].astype(np.float64)
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(truth * subs) / subs
    noisy += rng.normal(0.0, opts.read_noise_e / np.sqrt(subs), truth.shape)
    stars = [(s["x"], s["y"], s["flux"]) for s in sim.star_catalogue()]
    return noisy.astype(np.float32), truth, stars, float(sim.plans[0].fwhm)


def test_the_model_takes_noise_away(shipped: dn.Denoiser) -> None:
    noisy, truth, _, _ = _simulated_stack(8, seed=31)
    out = shipped(noisy)
    assert out.shape == noisy.shape and np.isfinite(out).all()
    err_in = np.sqrt(np.mean((noisy - truth) ** 2))
    err_out = np.sqrt(np.mean((out - truth) ** 2))
    assert err_out < 0.6 * err_in


def test_the_model_keeps_star_flux(shipped: dn.Denoiser) -> None:
    noisy, truth, stars, fwhm = _simulated_stack(16, seed=32)
    out = shipped(noisy)
    r = 2.0 * fwhm
    yy, xx = np.mgrid[0 : noisy.shape[0], 0 : noisy.shape[1]]
    ratios = []
    table = np.array(stars)
    for x, y, flux in stars:
        d = np.hypot(table[:, 0] - x, table[:, 1] - y)
        isolated = not ((d > 0) & (d < 2.5 * r) & (table[:, 2] > 0.01 * flux)).any()
        inside = 2.5 * r < x < noisy.shape[1] - 2.5 * r and 2.5 * r < y < noisy.shape[0] - 2.5 * r
        if not (isolated and inside and flux > 5000):
            continue
        ap = np.hypot(xx - x, yy - y) <= r
        ring = (np.hypot(xx - x, yy - y) > 1.5 * r) & (np.hypot(xx - x, yy - y) <= 2.5 * r)
        sky = np.median(truth[ring])  # the true sky around, for both
        got = (out[ap] - sky).sum()
        want = (truth[ap] - sky).sum()
        ratios.append(got / want)
    assert len(ratios) >= 5
    assert abs(np.median(ratios) - 1.0) < 0.02


@pytest.mark.realdata
def test_the_model_on_a_real_sub(shipped: dn.Denoiser, real_data: Path) -> None:
    """A raw 20 s sub of Arp 186 (ASI290MM): the sky gets quieter, the stars keep their flux
    (aperture sums of the measured stars, against the sub itself)."""
    from subwatch.calibration.apply import correct_pixels, find_outlier_pixels
    from subwatch.measure import measure_frame

    raw = fits.getdata(real_data / "jocular-arp186" / "L_1.fit").astype(np.float32)
    sub = correct_pixels(raw, find_outlier_pixels(raw))
    out = shipped(sub)
    stars = measure_frame(sub).stars
    keep = (stars.snr > 50) & ~stars.saturated
    h, w = sub.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ratios, quiet = [], np.ones(sub.shape, bool)
    for x, y in zip(stars.x, stars.y, strict=True):
        quiet &= np.hypot(xx - x, yy - y) > 12
    for x, y in zip(stars.x[keep], stars.y[keep], strict=True):
        if not (10 < x < w - 10 and 10 < y < h - 10):
            continue
        win = (slice(int(y) - 10, int(y) + 11), slice(int(x) - 10, int(x) + 11))
        d = np.hypot(xx[win] - x, yy[win] - y)
        ap, ring = d <= 5, (d > 7) & (d <= 10)
        sky = np.median(sub[win][ring])
        ratios.append((out[win][ap] - sky).sum() / (sub[win][ap] - sky).sum())
    assert len(ratios) >= 5
    assert abs(np.median(ratios) - 1.0) < 0.02
    assert _mad(out[quiet]) < 0.7 * _mad(sub[quiet])


def _mad(a: np.ndarray) -> float:
    """Robust standard deviation."""
    return float(1.4826 * np.median(np.abs(a - np.median(a))))
