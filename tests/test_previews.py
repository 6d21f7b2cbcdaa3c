"""Previews of live stacks: products, status.json, metrics, colour and composites."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from preview_standins import moffat_stack
from subwatch.config import Config
from subwatch.enhance.composite import canonical_filter, choose_palette
from subwatch.enhance.previews import (
    WRITTEN_ORDER,
    PreviewOptions,
    StackSnapshot,
    make_previews,
)
from subwatch.measure import measure_frame
from subwatch.service.daemon import Daemon
from subwatch.service.metrics import Metrics
from subwatch.simulate import SimOptions, simulate_session

W, H = 480, 360


def _cfg(capture: Path, out: Path, **previews: object) -> Config:
    return Config.model_validate(
        {"watch": {"path": str(capture)}, "output": {"path": str(out)}, "previews": previews}
    )


def _png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} is not a readable PNG"
    return image


@pytest.fixture(scope="module")
def mono_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Metrics]:
    """``run --once`` on eight 480x360 subs, previews rendered in the preview process."""
    root = tmp_path_factory.mktemp("previews")
    simulate_session(SimOptions(out=root / "capture", lights=8, width=W, height=H, seed=21))
    metrics = Metrics()
    Daemon(_cfg(root / "capture", root / "out"), once=True, metrics=metrics).run()
    return root / "out", metrics


def test_run_once_writes_every_product(mono_run) -> None:
    out, _ = mono_run
    folder = out / "M42" / "L"
    for name in ("preview.png", "deconvolved.png"):
        image = _png(folder / name)
        assert image.shape[:2] == (H, W)
        assert image.std() > 5, f"{name} is flat"  # stretched: not black, not white
    for name in ("background.fits", "deconvolved.fits"):
        with fits.open(folder / name) as hdul:
            assert hdul[0].data.shape == (H, W), name
            assert hdul[0].header["NCOMBINE"] == 8
    with fits.open(folder / "snr.fits") as hdul:  # one value per cell of CELLPX pixels
        cell = hdul[0].header["CELLPX"]
        assert hdul[0].data.shape == (H // cell, W // cell)
        assert np.nanmax(hdul[0].data) > 3  # the nebula and stars stand out of the noise
    assert not list(folder.glob(".*.tmp")), "no temporary file left behind"


def test_status_json_has_the_preview_numbers(mono_run) -> None:
    out, _ = mono_run
    status = json.loads((out / "M42" / "L" / "status.json").read_text())
    assert status["frames_stacked"] == 8  # the stack's own fields stay
    assert status["preview"]["frames"] == 8  # the final preview covers every sub
    assert status["preview"]["updated"].endswith("Z")
    for step in ("gradient", "snr", "psf", "deconvolve", "total"):
        assert status["preview"]["seconds"][step] >= 0, step
    gradient = status["gradient"]
    assert gradient["amplitude_percent"] > 0 and -360 <= gradient["angle_deg"] <= 360
    assert status["snr"] > 0
    report = status["snr_report"]
    assert report["noise"] > 0
    assert "forecast_seconds" in report
    assert status["psf"]["fwhm"] == pytest.approx(status["fwhm_median"], rel=0.25)
    assert status["deconvolution"]["iterations"] >= 1
    # Previews at 5 subs (every_frames) and at the end: the forecast's history grows.
    assert [p[0] for p in status["snr_history"]] == [300.0, 480.0]
    # The shipped model denoises the deconvolved stack, after deconvolution.
    assert status["preview"]["skipped"] == {}
    assert status["preview"]["denoise"]["input"] == "deconvolved"
    # Deconvolution runs on a thread beside the SNR report and the preview; the list keeps
    # the steps' order whichever finished first.
    assert status["preview"]["products"] == list(WRITTEN_ORDER)  # all seven, in that order
    assert status["preview"]["failed"] == {}


def test_metrics_follow_the_preview(mono_run) -> None:
    out, metrics = mono_run
    status = json.loads((out / "M42" / "L" / "status.json").read_text())
    text = metrics.render()[0].decode()
    assert 'subwatch_preview_seconds_count{product="preview"} 2.0' in text
    assert 'subwatch_preview_seconds_count{product="deconvolved"} 2.0' in text
    line = next(x for x in text.splitlines() if x.startswith("subwatch_stack_snr{"))
    assert float(line.split()[-1]) == pytest.approx(status["snr"], rel=1e-3)
    line = next(x for x in text.splitlines() if x.startswith("subwatch_stack_noise_adu{"))
    assert float(line.split()[-1]) == pytest.approx(status["snr_report"]["noise"], rel=1e-3)
    assert any(x.startswith("subwatch_stack_forecast_seconds{") for x in text.splitlines())


def test_colour_stack_with_no_data_edges(tmp_path: Path) -> None:
    """An OSC stack (H, W, 3) whose dithered edges no sub covered (NaN in the snapshot)."""
    mono = moffat_stack((H, W), seed=2)
    image = np.stack([mono * 0.9, mono, mono * 1.2], axis=2)
    image[:, :12] = np.nan
    snap = StackSnapshot(image, "M8", "OSC", n_frames=4, integration_s=240.0)
    result = make_previews(snap, tmp_path, PreviewOptions())
    assert _png(tmp_path / "preview.png").shape == (H, W, 3)
    assert (_png(tmp_path / "preview.png")[:, :12] == 0).all()  # no data is black
    deconvolved = fits.getdata(tmp_path / "deconvolved.fits")
    assert deconvolved.shape == (3, H, W)
    assert np.isnan(deconvolved[:, :, :12]).all() and np.isfinite(deconvolved[:, :, 12:]).all()
    assert result.status["psf"]["n_stars"] >= 5


def _sky_spread(plane: np.ndarray) -> float:
    """MAD of the darker half of a stretched plane: its sky noise, stars left out."""
    sky = plane[plane <= np.median(plane)].astype(float)
    return float(np.median(np.abs(sky - np.median(sky))))


def test_png_depth_and_colour_stretch_on_request(tmp_path: Path) -> None:
    """16-bit PNGs, and an unlinked stretch, when the config asks for them."""
    stars = moffat_stack((H, W), noise=0.0, seed=5)
    rng = np.random.default_rng(5)
    # The same stars in every channel; the blue channel is three times as noisy.
    image = np.stack(
        [stars + rng.normal(0, s, (H, W)).astype(np.float32) for s in (4.0, 4.0, 12.0)], axis=2
    )
    cfg = Config.model_validate({"previews": {"colour_stretch": "unlinked", "png_bits": 16}})
    opts = PreviewOptions.from_config(cfg)
    assert (opts.linked, opts.png_bits) == (False, 16)
    spreads = {}
    for name, options in (("linked", PreviewOptions()), ("unlinked", opts)):
        folder = tmp_path / name
        make_previews(StackSnapshot(image, "M8", "OSC"), folder, options)
        png = _png(folder / "preview.png")
        assert png.dtype == (np.uint16 if name == "unlinked" else np.uint8)
        assert _png(folder / "deconvolved.png").dtype == png.dtype
        # cv2 reads colour as BGR: channel 0 is blue, 2 red.
        spreads[name] = _sky_spread(png[:, :, 0]) / _sky_spread(png[:, :, 2])
    # Linked, one transform for all channels: blue's sky looks three times as noisy as red's.
    # Unlinked, each channel's own noise sets its shadows and midtones: far less apart.
    assert spreads["linked"] > 2.2
    assert spreads["unlinked"] < 1.5


def test_products_follow_the_config(tmp_path: Path) -> None:
    image = moffat_stack((H, W), seed=3)
    opts = PreviewOptions(products=("preview",))
    status = make_previews(StackSnapshot(image), tmp_path, opts).status
    assert (tmp_path / "preview.png").is_file()
    assert not (tmp_path / "deconvolved.png").exists()
    assert "psf" not in status and "denoised" not in status["preview"]["skipped"]


def test_a_failing_step_leaves_the_other_products(tmp_path: Path, monkeypatch, caplog) -> None:
    from subwatch.enhance import previews

    def broken(*args: object, **kwargs: object) -> None:
        raise FloatingPointError("the PSF went wrong\nand said more")

    monkeypatch.setattr(previews, "_deconvolve", broken)
    image = moffat_stack((H, W), seed=4)
    status = make_previews(StackSnapshot(image, "M1", "L"), tmp_path).status
    assert (tmp_path / "preview.png").is_file() and (tmp_path / "snr.fits").is_file()
    assert not (tmp_path / "deconvolved.png").exists()
    why = "FloatingPointError: the PSF went wrong"
    assert status["preview"]["failed"] == {"deconvolved": why}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"M1/L: deconvolved failed: {why}"
    ]


def test_the_denoiser_hook_writes_its_products(tmp_path: Path, monkeypatch) -> None:
    from subwatch.enhance import previews

    monkeypatch.setattr(previews, "load_denoiser", lambda opts: (lambda image: image * 0.5, ""))
    status = make_previews(StackSnapshot(moffat_stack((H, W), seed=6)), tmp_path).status
    assert _png(tmp_path / "denoised.png").shape == (H, W)
    assert fits.getdata(tmp_path / "denoised.fits").shape == (H, W)
    assert "denoised" not in status["preview"]["skipped"]
    assert status["preview"]["product_seconds"]["denoised"] >= 0


def test_filter_names_and_palettes() -> None:
    assert [canonical_filter(f) for f in ("Red", "g", "BLUE", "H-alpha", "O3", "SII", "L")] == [
        "R",
        "G",
        "B",
        "Ha",
        "OIII",
        "SII",
        None,
    ]
    assert choose_palette(["L", "R", "G", "B"]) == ("RGB", {"R": "R", "G": "G", "B": "B"})
    assert choose_palette(["Ha", "OIII", "SII"])[0] == "SHO"
    assert choose_palette(["Halpha", "OIII"]) == ("HOO", {"Ha": "Halpha", "OIII": "OIII"})
    assert choose_palette(["L", "Ha"]) is None


def test_rgb_stacks_make_a_registered_composite(tmp_path: Path) -> None:
    """R, G and B stacks of one target, each on its own reference (dithered): one composite."""
    capture, out = tmp_path / "capture", tmp_path / "out"
    simulate_session(
        SimOptions(out=capture, lights=9, width=W, height=H, seed=9, filters=("R", "G", "B"))
    )
    Daemon(_cfg(capture, out), once=True).run()
    composite = _png(out / "M42" / "composite.png")
    assert composite.shape == (H, W, 3)
    planes = composite.reshape(-1, 3).astype(float)
    assert min(planes.std(axis=0)) > 5  # every channel holds an image
    # Registered: many bright stars of each channel sit within half a pixel of one of the
    # first channel's (the stacks' references were dithered by up to 15 px from each other;
    # colours differ, so not every star is bright in every channel).
    stars = [measure_frame(composite[:, :, c].astype(np.float32)).stars.xyf() for c in range(3)]
    first = stars[0][:30, :2]
    for other in stars[1:]:
        gaps = np.linalg.norm(other[:30, None, :2] - first[None, :, :], axis=2).min(axis=1)
        assert (gaps < 0.5).sum() >= 8
    status = json.loads((out / "M42" / "B" / "status.json").read_text())
    assert status["composite"]["palette"] == "RGB"
