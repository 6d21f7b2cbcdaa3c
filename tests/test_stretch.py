"""The automatic stretch, the colour calibration and the PNG files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import render_gaussian_stars
from subwatch.enhance.gradient import fit_gradient, remove_gradient
from subwatch.enhance.stretch import (
    auto_stretch,
    mtf,
    neutralise_colour,
    to_integers,
    white_balance,
    write_png,
)
from subwatch.simulate import SimOptions, Simulation
from test_gradient import GAIN


@pytest.fixture(scope="module")
def light() -> tuple[np.ndarray, np.ndarray]:
    """A simulated 640x480 light (ADU, noisy, saturating stars) and its noiseless stars."""
    sim = Simulation(SimOptions(out=Path("unused"), lights=1, width=640, height=480, seed=8))
    expected = sim.light_signal(0, transients=False)[0] / GAIN
    stars = sim.light_signal(0, glow=False, nebula=False, transients=False)[0] / GAIN
    rng = np.random.default_rng(8)
    image = rng.poisson(expected * GAIN).astype(np.float32) / GAIN
    return np.minimum(image, 60000.0).astype(np.float32), stars


@pytest.mark.parametrize("midtone", [0.2, 0.25])
def test_median_lands_at_the_midtone(light, midtone: float) -> None:
    image, stars = light
    flat = remove_gradient(image, fit_gradient(image))
    out = auto_stretch(flat, midtone=midtone)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    eight = to_integers(out) / 255.0
    assert np.median(eight) == pytest.approx(midtone, abs=0.02)
    # White only at star cores, and few pixels even there.
    white = eight >= 1.0
    assert white.mean() <= 0.001
    assert np.all(stars[white] > 100 * np.sqrt(np.median(image)))
    # Shadows: 2.8 MAD below the median clips about 0.3 % of the sky (0.26 % for a Gaussian).
    assert (out == 0).mean() < 0.01


def test_mtf() -> None:
    for m in (0.01, 0.2, 0.5, 0.9):
        assert mtf(m, 0.0) == 0.0 and mtf(m, 1.0) == pytest.approx(1.0)
        assert mtf(m, m) == pytest.approx(0.5)
    x = np.linspace(0, 1, 101)
    assert np.all(np.diff(mtf(0.05, x)) > 0)
    # The balance that sends a median of 0.004 to 0.25 is MTF(0.25, 0.004).
    assert mtf(mtf(0.25, 0.004), 0.004) == pytest.approx(0.25)


def _colour_field(seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey stars seen through a green-heavy, red-poor sensor over an orange sky glow."""
    rng = np.random.default_rng(seed)
    h, w = 360, 480
    n = 150
    xy = np.column_stack([rng.uniform(20, w - 20, n), rng.uniform(20, h - 20, n)])
    flux = 10 ** rng.uniform(3.3, 5.0, n)
    grey = render_gaussian_stars((h, w), xy, flux, 3.0, background=0.0, noise=False)
    response = np.array([0.7, 1.0, 1.3])
    sky = np.array([300.0, 220.0, 150.0])
    planes = [
        rng.poisson(np.maximum(grey * response[c] + sky[c], 0)).astype(np.float32) for c in range(3)
    ]
    return np.stack(planes, axis=2), response, sky


def test_neutralise_colour_grey_sky_and_white_stars() -> None:
    image, response, sky = _colour_field()
    scale = white_balance(image)
    # The balance undoes the sensor's response (up to a common factor).
    assert scale * response / np.mean(scale * response) == pytest.approx(np.ones(3), abs=0.03)
    out = neutralise_colour(image)
    assert out.shape == image.shape and out.dtype == np.float32
    medians = np.median(out, axis=(0, 1))
    assert np.ptp(medians) < 0.01 * medians.mean()  # a grey sky
    assert medians.mean() == pytest.approx(sky.mean(), rel=0.02)
    # Linked stretch of the neutralised image: the sky is grey in the picture too.
    stretched = auto_stretch(out, linked=True)
    assert np.ptp(np.median(stretched, axis=(0, 1))) < 0.01


def test_linked_and_unlinked_colour() -> None:
    image, _, _ = _colour_field()
    unlinked = auto_stretch(image, midtone=0.25)
    assert np.median(unlinked, axis=(0, 1)) == pytest.approx([0.25] * 3, abs=0.01)
    linked = auto_stretch(image, midtone=0.25, linked=True)
    medians = np.median(linked, axis=(0, 1))
    assert medians[0] > medians[1] > medians[2]  # the orange sky stays orange
    assert np.mean(medians) == pytest.approx(0.25, abs=0.05)


def test_too_few_stars_only_neutralises_the_sky() -> None:
    rng = np.random.default_rng(1)
    image = np.stack([rng.normal(v, 5, (200, 200)) for v in (100, 200, 300)], 2)
    image = image.astype(np.float32)
    assert white_balance(image) == pytest.approx(np.ones(3))
    assert np.ptp(np.median(neutralise_colour(image), axis=(0, 1))) < 1.0


@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip(tmp_path: Path, bits: int) -> None:
    rng = np.random.default_rng(0)
    grey = rng.uniform(0, 1, (60, 80)).astype(np.float32)
    rgb = np.stack([grey, 1 - grey, np.full_like(grey, 0.25)], axis=2)
    top = 2**bits - 1
    for name, image in (("grey.png", grey), ("rgb.png", rgb)):
        path = tmp_path / "out" / name
        write_png(path, image, bits=bits)
        back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert back.dtype == (np.uint8 if bits == 8 else np.uint16)
        if back.ndim == 3:
            back = back[:, :, ::-1]  # OpenCV reads BGR
        assert np.array_equal(back, to_integers(image, bits))
        assert np.abs(back / top - image).max() <= 0.5 / top + 1e-6
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grey.png", "rgb.png"]


def test_png_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits"):
        write_png(tmp_path / "a.png", np.zeros((4, 4)), bits=12)
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 2)))
    assert not list(tmp_path.iterdir())
