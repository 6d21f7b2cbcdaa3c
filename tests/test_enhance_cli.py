"""``subwatch enhance``: the preview cycle on a linear FITS from anywhere, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits

from preview_standins import moffat_stack
from subwatch.cli import main

H, W = 300, 400


def _linear_stack(seed: int = 3) -> np.ndarray:
    """A stack-like linear image: Moffat stars on a sky tilted by 15 % across the frame."""
    return moffat_stack((H, W), seed=seed, tilt=0.15)


def _write(path: Path, data: np.ndarray, **cards: object) -> Path:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    fits.PrimaryHDU(data=data, header=header).writeto(path)
    return path


def _png_shape(path: Path) -> tuple[int, ...]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} is not a readable PNG"
    return image.shape


def test_mono_stack(tmp_path: Path, capsys) -> None:
    stack = _write(
        tmp_path / "stack.fits",
        _linear_stack(),
        OBJECT="NGC 7000",
        FILTER="Ha",
        NCOMBINE=12,
        EXPTIME=3600.0,
    )
    assert main(["enhance", str(stack), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "NGC_7000" / "Ha"
    assert _png_shape(folder / "preview.png")[:2] == (H, W)
    assert _png_shape(folder / "deconvolved.png")[:2] == (H, W)
    for name in ("background.fits", "deconvolved.fits"):
        assert fits.getdata(folder / name).shape == (H, W), name
    assert fits.getdata(folder / "snr.fits").ndim == 2
    status = json.loads((folder / "status.json").read_text())
    assert status["frames_stacked"] == 12 and status["integration_seconds"] == 3600.0
    assert status["gradient"]["amplitude_percent"] > 5  # the 15 % + 5 % tilt was seen
    assert status["snr"] > 0
    assert status["psf"]["fwhm"] == pytest.approx(3.0, rel=0.15)
    assert status["preview"]["skipped"] == {}
    assert fits.getdata(folder / "denoised.fits").shape == (H, W)
    assert _png_shape(folder / "denoised.png")[:2] == (H, W)
    out = capsys.readouterr().out
    assert "NGC_7000/Ha" in out and "preview.png" in out


@pytest.mark.parametrize("order", ["planes-first", "planes-last"])
def test_colour_cube_in_either_axis_order(tmp_path: Path, order: str) -> None:
    mono = _linear_stack(seed=5)
    cube = np.stack([mono * 1.1, mono, mono * 0.8])  # (3, H, W), as FITS tools write colour
    cube[:, :8] = np.nan  # rows 0-7 hold no data (a dither edge)
    if order == "planes-last":
        cube = np.moveaxis(cube, 0, -1)  # (H, W, 3), as some scripts write it
    stack = _write(tmp_path / "m42_rgb.fits", cube.astype(np.float32))
    assert main(["enhance", str(stack), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "m42_rgb" / "OSC"
    assert _png_shape(folder / "preview.png") == (H, W, 3)
    deconvolved = fits.getdata(folder / "deconvolved.fits")
    assert deconvolved.shape == (3, H, W)
    assert np.isnan(deconvolved[:, :8]).all()  # no data stays no data
    assert np.isfinite(deconvolved[:, 8:]).all()


def test_integer_stack(tmp_path: Path) -> None:
    data = np.clip(_linear_stack(seed=7), 0, 65535).astype(np.uint16)
    stack = _write(tmp_path / "int.fits", data, OBJECT="M31")
    assert main(["enhance", str(stack), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "M31" / "nofilter" / "preview.png").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", "not a FITS file"),
        ("table", "no image"),
        ("cube4", "neither mono"),
        ("tiny", "too small"),
        ("nan", "every pixel is NaN"),
        ("missing", "no such file"),
    ],
)
def test_garbage_is_refused_with_exit_1(tmp_path: Path, capsys, content: str, message: str) -> None:
    path = tmp_path / "input.fits"
    if content == "text":
        path.write_text("SIMPLE = this is not FITS\n" * 40)
    elif content == "table":
        table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=[1.0])])
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    elif content == "cube4":
        _write(path, np.zeros((4, 32, 32), np.float32))
    elif content == "tiny":
        _write(path, np.zeros((8, 8), np.float32))
    elif content == "nan":
        _write(path, np.full((32, 32), np.nan, np.float32))
    assert main(["enhance", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["enhance", str(tmp_path / "x.fits")])  # no --out
    assert exc.value.code == 2
