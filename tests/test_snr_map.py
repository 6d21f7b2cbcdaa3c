"""The stack's SNR report: noise against the sqrt(N) promise, the SNR map and the forecast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.stats import spearmanr

from subwatch.config import Config
from subwatch.enhance.gradient import fit_gradient
from subwatch.enhance.snr import (
    SNR_CELL,
    expected_noise,
    forecast_seconds,
    snr_map,
    stack_snr_report,
)
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, Simulation, simulate_session
from test_gradient import GAIN, smaller_nebula

EXPTIME = 60.0
LIGHTS = 9
EARLY = 4  # the stack of the first subs, whose forecast the full stack checks


def _stack(capture: Path, out: Path) -> tuple[np.ndarray, list[dict]]:
    cfg = {"watch": {"path": str(capture)}, "output": {"path": str(out)}}
    run_daemon(Config.model_validate({**cfg, "previews": {"enabled": False}}), once=True)
    rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    lights = [r for r in rows if r["kind"] == "light" and r["status"] == "stacked"]
    stack = fits.getdata(out / lights[0]["target"] / lights[0]["filter"] / "stack.fits")
    return stack.astype(np.float32), lights


def _report(stack: np.ndarray, lights: list[dict], history=(), target: float = 50.0):
    # The subs' noise after photometric scaling, and the daemon's weights (inverse variance).
    noises = [r["noise"] * r.get("flux_scale", 1.0) for r in lights]
    return stack_snr_report(
        stack,
        n_frames=len(lights),
        sub_noises=noises,
        weights=[1.0 / n**2 for n in noises],
        integration_s=EXPTIME * len(lights),
        snr_history=list(history),
        target_snr=target,
    )


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Nine simulated subs stacked, and the stack of the first four (same calibration)."""
    root = tmp_path_factory.mktemp("snr")
    opts = SimOptions(
        out=root / "capture", lights=LIGHTS, width=640, height=480, seed=31, exptime=EXPTIME
    )
    with pytest.MonkeyPatch.context() as mp, smaller_nebula(mp):
        truth = simulate_session(opts)
        sim = Simulation(opts)
    early = root / "early"
    shutil.copytree(opts.out / "calibration", early / "calibration")
    for light in truth["lights"][:EARLY]:
        (early / light["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(opts.out / light["file"], early / light["file"])
    stack, lights = _stack(opts.out, root / "out")
    early_stack, early_lights = _stack(early, root / "early-out")
    assert len(lights) == LIGHTS and len(early_lights) == EARLY
    nebula = sim.light_signal(0, stars=False, glow=False, transients=False)[0] / GAIN
    return {
        "stack": stack,
        "lights": lights,
        "early": early_stack,
        "early_lights": early_lights,
        "nebula": nebula,
    }


def test_noise_matches_the_sqrt_n_expectation(night: dict) -> None:
    report, _ = _report(night["stack"], night["lights"])
    assert report["n_eff"] == pytest.approx(LIGHTS, rel=0.05)
    assert abs(report["noise_ratio"] - 1.0) < 0.05, report
    # The warp mixes neighbouring pixels' noise; unmixing it is what makes the ratio 1.
    assert report["noise_mixing"] > 1.1
    early, _ = _report(night["early"], night["early_lights"])
    assert abs(early["noise_ratio"] - 1.0) < 0.05, early
    json.dumps(report)  # status.json takes it as it is


def test_snr_grows_as_sqrt_n_and_the_forecast_agrees(night: dict) -> None:
    full, _ = _report(night["stack"], night["lights"])
    early, _ = _report(night["early"], night["early_lights"])
    expected_growth = np.sqrt(full["n_eff"] / early["n_eff"])
    assert full["snr"] / early["snr"] == pytest.approx(expected_growth, rel=0.1)
    # From the early stack, the time to reach the full stack's SNR is the subs in between.
    history = [(EXPTIME * n, early["snr"] * np.sqrt(n / EARLY)) for n in (1, 2, 3)]
    forecast, _ = _report(night["early"], night["early_lights"], history, target=full["snr"])
    assert forecast["forecast_method"] == "fit"
    assert forecast["forecast_seconds"] == pytest.approx(EXPTIME * (LIGHTS - EARLY), rel=0.25)
    reached, _ = _report(night["stack"], night["lights"], target=10.0)
    assert reached["forecast_seconds"] is None and reached["forecast_method"] == "reached"


def test_snr_map_follows_the_nebula(night: dict) -> None:
    stack = night["stack"]
    report, smap = _report(stack, night["lights"])
    h, w = stack.shape
    assert smap.shape == (h // SNR_CELL, w // SNR_CELL) and smap.dtype == np.float32
    assert report["snr_map_cell_px"] == SNR_CELL
    cells = night["nebula"][: smap.shape[0] * SNR_CELL, : smap.shape[1] * SNR_CELL]
    nebula = cells.reshape(smap.shape[0], SNR_CELL, smap.shape[1], SNR_CELL).mean(axis=(1, 3))
    sky = nebula < 0.002 * np.median(stack)
    assert sky.sum() > 20 and (~sky).sum() > 20
    assert abs(float(np.median(smap[sky]))) < 0.3  # sky cells: no signal above the model
    # Signal over one pixel's noise. The nebula's own shot noise raises the noise on it by
    # sqrt((sky + nebula) / sky); its filaments, as sharp as the pixels at this size, read as
    # noise too, so the map is on the cautious side there.
    sky_level = float(np.median(stack[: smap.shape[0] * SNR_CELL, : smap.shape[1] * SNR_CELL]))
    bright = nebula > 0.3 * nebula.max()
    shot_noise = report["noise"] * np.sqrt(1.0 + nebula[bright] / sky_level)
    ratio = float(np.median(smap[bright] * shot_noise / nebula[bright]))
    assert 0.6 < ratio < 1.05
    assert spearmanr(smap[~sky], nebula[~sky]).statistic > 0.9


def test_snr_map_of_a_smooth_blob() -> None:
    """Sky 1000 e- and a broad blob with Poisson noise: the map is blob / sqrt(sky + blob)."""
    h, w = 384, 512
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    blob = 3000.0 * np.exp(-((xx - 256) ** 2 + (yy - 192) ** 2) / (2 * 70.0**2))
    rng = np.random.default_rng(2)
    image = rng.poisson(1000.0 + blob).astype(np.float32)
    smap = snr_map(image, np.full((h, w), 1000.0, np.float32))
    cells = blob.reshape(h // SNR_CELL, SNR_CELL, w // SNR_CELL, SNR_CELL).mean(axis=(1, 3))
    total = (1000.0 + blob).reshape(cells.shape[0], SNR_CELL, cells.shape[1], SNR_CELL)
    truth = cells / np.sqrt(total.mean(axis=(1, 3)))
    strong = truth > 3
    assert strong.sum() > 10
    assert np.median(smap[strong] / truth[strong]) == pytest.approx(1.0, abs=0.05)
    assert np.abs(smap[truth < 0.05]).max() < 0.5


def test_expected_noise() -> None:
    sigma, n_eff = expected_noise([10.0] * 4, None)
    assert sigma == pytest.approx(5.0) and n_eff == pytest.approx(4.0)
    # Inverse-variance weights: 1 / sqrt(sum 1 / sigma^2).
    noises = [10.0, 20.0]
    sigma, n_eff = expected_noise(noises, [1 / n**2 for n in noises])
    assert sigma == pytest.approx(1.0 / np.sqrt(1 / 100 + 1 / 400))
    assert n_eff == pytest.approx((1 / 100 + 1 / 400) ** 2 / (1 / 100**2 + 1 / 400**2))
    assert expected_noise([10.0, 10.0], [])[0] == pytest.approx(10 / np.sqrt(2))  # no weights


def test_forecast() -> None:
    k = 2.0  # SNR = k sqrt(t)
    history = [(t, k * np.sqrt(t)) for t in (60.0, 120.0, 300.0)]
    left, how = forecast_seconds(k * np.sqrt(600.0), 600.0, history, target=100.0)
    assert how == "fit" and left == pytest.approx((100.0 / k) ** 2 - 600.0)
    left, how = forecast_seconds(20.0, 100.0, [], target=40.0)
    assert how == "sqrt" and left == pytest.approx(300.0)
    # A night that grows slower than sqrt(t) is forecast from its whole history.
    slow = [(t, 3.0 * t**0.4) for t in (60.0, 240.0, 960.0)]
    left, _ = forecast_seconds(3.0 * 960.0**0.4, 960.0, slow[:-1], target=100.0)
    assert left > 0
    assert forecast_seconds(None, 100.0, [], 50.0) == (None, None)
    assert forecast_seconds(60.0, 100.0, [], 50.0) == (0.0, "reached")


def test_snr_map_of_flat_noise_is_zero_mean() -> None:
    rng = np.random.default_rng(1)
    image = (1000.0 + rng.normal(0, 10, (256, 320))).astype(np.float32)
    smap = snr_map(image, fit_gradient(image).background)
    assert smap.shape == (8, 10)
    assert abs(float(smap.mean())) < 0.1
    assert float(smap.std()) < 0.1  # a cell's mean over one pixel's noise: 1 / 32 per cell
