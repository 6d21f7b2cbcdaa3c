"""Calibration: masters, matching, dark scaling, cosmetics and debayering do what they claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from conftest import render_gaussian_stars
from subwatch.calibration import CalibrationLibrary, calibrate_light, debayer
from subwatch.calibration.apply import correct_pixels, find_outlier_pixels
from subwatch.calibration.combine import sigma_clipped_mean
from subwatch.config import CalibrationConfig
from subwatch.frames import FrameMeta, read_frame


def test_sigma_clipped_mean_drops_a_cosmic_ray() -> None:
    rng = np.random.default_rng(0)
    frames = [rng.normal(500, 3, (40, 60)).astype(np.float32) for _ in range(7)]
    frames[2][10, 10] = 60000
    master = sigma_clipped_mean(frames)
    assert abs(master[10, 10] - 500) < 6
    assert abs(float(master.mean()) - 500) < 0.2


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_debayer_puts_colours_where_the_pattern_says(pattern: str) -> None:
    level = {"R": 4000.0, "G": 2000.0, "B": 500.0}
    cfa = np.zeros((64, 64), np.float32)
    for i, colour in enumerate(pattern):
        cfa[i // 2 :: 2, i % 2 :: 2] = level[colour]
    rgb = debayer(cfa, pattern)
    centre = rgb[20:40, 20:40].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre, [4000, 2000, 500], rtol=0.02)


def test_outliers_are_hot_pixels_not_star_cores() -> None:
    rng = np.random.default_rng(2)
    xy = np.column_stack([rng.uniform(10, 190, 40), rng.uniform(10, 190, 40)])
    img = render_gaussian_stars((200, 200), xy, np.full(40, 40000.0), 2.2)
    hot = [(50, 60), (120, 33), (77, 150)]
    for r, c in hot:
        img[r, c] += 5000
    found = {tuple(p) for p in find_outlier_pixels(img)}
    assert set(hot) <= found
    star_cores = {(round(y), round(x)) for x, y in xy}
    assert len(found & star_cores) == 0
    fixed = correct_pixels(img, np.array(hot))
    for r, c in hot:
        assert fixed[r, c] < 1200


def _write(path: Path, data: np.ndarray, **cards: object) -> Path:
    hdu = fits.PrimaryHDU(np.clip(data, 0, 65535).astype(np.uint16))
    for k, v in cards.items():
        hdu.header[k.replace("_", "-")] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path)
    return path


def test_library_scales_darks_and_refuses_wrong_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    shape = (60, 80)
    bias_level, current = 300.0, np.full(shape, 2.0)  # ADU per second
    current[5, 5] = 200.0  # a hot pixel
    lib = CalibrationLibrary(tmp_path / "masters", CalibrationConfig())
    for i in range(3):
        p = _write(
            tmp_path / f"bias_{i}.fits",
            bias_level + rng.normal(0, 2, shape),
            IMAGETYP="Bias Frame",
            GAIN=100,
        )
        lib.add(p, read_frame(p).meta)
        p = _write(
            tmp_path / f"dark_{i}.fits",
            bias_level + current * 10 + rng.normal(0, 2, shape),
            IMAGETYP="Dark Frame",
            EXPTIME=10.0,
            GAIN=100,
        )
        lib.add(p, read_frame(p).meta)
        p = _write(
            tmp_path / f"bigflat_{i}.fits",
            np.full((30, 40), 20000.0),
            IMAGETYP="Flat Field",
            GAIN=100,
        )
        lib.add(p, read_frame(p).meta)
    light = FrameMeta(path="l.fits", kind="light", exptime=30.0, gain=100.0, width=80, height=60)
    masters = lib.match(light)
    assert masters.bias is not None and masters.dark is not None
    assert masters.dark_scale == pytest.approx(3.0)
    assert any("scaled from 10s to 30s" in n for n in masters.notes)
    assert masters.flat is None and any("flat master refused" in n for n in masters.notes)
    raw = bias_level + current * 30 + 1000.0
    out = calibrate_light(raw.astype(np.float32), masters, exptime=30.0, bayer=None)
    assert abs(float(np.median(out)) - 1000.0) < 2.0
    assert abs(float(out[5, 5]) - 1000.0) < 10.0  # hot pixel removed by scaling and cosmetics
    assert (tmp_path / "masters").is_dir() and any((tmp_path / "masters").iterdir())
