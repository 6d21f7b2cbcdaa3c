"""The stack's noise falls as 1/sqrt(N): no signal lost, no noise added, no noise hidden."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session

BIN = 4


def _basis(shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / 100.0
    return np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], -1)


def _sky_noise(stack: np.ndarray, model: np.ndarray) -> float:
    """Per-pixel noise of the stack, measured at a 4x4 scale, signal removed.

    The stack is fitted as a x truth + a quadratic surface: the sky gradient drifts through
    the night and transparency changes every object's brightness by a common factor, neither
    of which is noise. Bins on stars (where any sub-pixel mismatch shows) are left out.
    Interpolation moves noise between neighbouring pixels but cannot change its power at
    larger scales, so binned noise x 4 is the honest per-pixel figure.
    """
    h, w = (s // BIN * BIN for s in stack.shape)

    def binned(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // BIN, BIN, w // BIN, BIN).mean(axis=(1, 3))

    sky, st = binned(model), binned(stack)
    basis = _basis(sky.shape)
    design = np.concatenate([sky[..., None], basis], axis=-1)
    smooth_sky = basis @ np.linalg.lstsq(basis.reshape(-1, 6), sky.ravel(), rcond=None)[0]
    rough = np.abs(sky - smooth_sky)
    keep = rough < np.percentile(rough, 60)  # no stars, no sharp nebular edges
    keep[:4], keep[-4:], keep[:, :4], keep[:, -4:] = False, False, False, False  # dither edges
    coef, *_ = np.linalg.lstsq(design[keep], st[keep], rcond=None)
    residual = (st - design @ coef)[keep]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))) * BIN)


def _run(capture: Path, out: Path, truth: dict, rejection: str) -> tuple[float, list[dict]]:
    cfg = Config.model_validate(
        {
            "watch": {"path": str(capture)},
            "output": {"path": str(out)},
            "stacking": {"rejection": rejection},
        }
    )
    run_daemon(cfg, once=True)
    rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    lights = [r for r in rows if r["kind"] == "light" and r["status"] == "stacked"]
    stack = fits.getdata(out / lights[0]["target"] / lights[0]["filter"] / "stack.fits")
    model = fits.getdata(capture / truth["truth_sky"]).astype(np.float64) / truth["gain"]
    return _sky_noise(stack.astype(np.float64), model), lights


@pytest.mark.parametrize("rejection", ["none", "kappa-sigma"])
def test_noise_falls_as_one_over_sqrt_n(tmp_path: Path, rejection: str) -> None:
    """Integration alone, and with the default rejection, which must not cost noise either."""
    opts = {"width": 480, "height": 360, "seed": 31, "seeing": (3.0, 3.0), "dither_px": 10.0}
    truth1 = simulate_session(SimOptions(out=tmp_path / "one", lights=1, **opts))
    sigma_1, _ = _run(tmp_path / "one", tmp_path / "out1", truth1, rejection)
    truth = simulate_session(SimOptions(out=tmp_path / "many", lights=9, **opts))
    sigma_n, lights = _run(tmp_path / "many", tmp_path / "outn", truth, rejection)
    assert len(lights) == 9
    weights = np.array([1.0 / r["noise"] ** 2 for r in lights])
    n_eff = weights.sum() ** 2 / (weights**2).sum()
    expected = sigma_1 / np.sqrt(n_eff)
    assert abs(sigma_n / expected - 1.0) < 0.05, (sigma_n, expected, n_eff)
