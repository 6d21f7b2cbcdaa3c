"""Reading frames: completeness from the header, lenient headers, refusals with reasons."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from subwatch.frames import (
    FrameReadError,
    IncompleteFrame,
    check_complete,
    expected_fits_size,
    read_frame,
)
from subwatch.frames.meta import normalise_header
from subwatch.frames.outputs import JsonlWriter, write_fits_atomic


def _fits_bytes(data: np.ndarray, **cards: object) -> bytes:
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def test_expected_size_matches_a_complete_file(tmp_path: Path) -> None:
    payload = _fits_bytes(np.zeros((50, 70), np.uint16), IMAGETYP="Light Frame")
    path = tmp_path / "a.fits"
    path.write_bytes(payload)
    assert expected_fits_size(path) == len(payload)
    assert check_complete(path) == len(payload)


@pytest.mark.parametrize("keep", [100, 2880, 2880 + 1000])
def test_a_partly_written_file_is_incomplete(tmp_path: Path, keep: int) -> None:
    payload = _fits_bytes(np.zeros((50, 70), np.uint16))
    path = tmp_path / "partial.fits"
    path.write_bytes(payload[:keep])
    with pytest.raises(IncompleteFrame) as err:
        check_complete(path)
    assert err.value.reason == "incomplete"
    with pytest.raises(IncompleteFrame):
        read_frame(path)


def test_non_fits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.fits"
    path.write_text("this is a text file, not an image" * 200)
    with pytest.raises(FrameReadError) as err:
        read_frame(path)
    assert err.value.reason == "not a FITS file"


def test_absurd_dimensions_are_refused_before_reading(tmp_path: Path) -> None:
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = 16
    header["NAXIS"] = 2
    header["NAXIS1"] = 90000
    header["NAXIS2"] = 90000
    path = tmp_path / "huge.fits"
    path.write_bytes(header.tostring().encode() + b"\0" * 2880)
    with pytest.raises(FrameReadError) as err:
        read_frame(path, max_dimension=20000)
    assert err.value.reason == "absurd dimensions"


def test_decimal_comma_and_nan_pixels(tmp_path: Path) -> None:
    data = np.full((40, 40), 100.0, np.float32)
    data[3, 4] = np.nan
    data[5, 6] = np.inf
    raw = bytearray(_fits_bytes(data, EXPTIME=1.5, IMAGETYP="Bias Frame"))
    card = b"EXPTIME =                  1.5"
    pos = raw.find(card)
    assert pos >= 0
    raw[pos : pos + len(card)] = b"EXPTIME =              6,4E-05"
    path = tmp_path / "comma.fits"
    path.write_bytes(bytes(raw))
    frame = read_frame(path)
    assert frame.meta.exptime == pytest.approx(6.4e-5)
    assert frame.meta.kind == "bias"
    assert frame.bad_pixels == 2
    assert frame.mask is not None and frame.mask[3, 4] and frame.mask[5, 6]
    assert np.isfinite(frame.data).all()
    assert frame.data[3, 4] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("cards", "name", "kind", "source"),
    [
        ({"IMAGETYP": "Light Frame"}, "x.fits", "light", "header:IMAGETYP"),
        ({"IMAGETYP": "LIGHT"}, "x.fits", "light", "header:IMAGETYP"),
        ({"FRAME": "Light"}, "x.fits", "light", "header:FRAME"),
        ({"IMAGETYP": "Flat Field"}, "x.fits", "flat", "header:IMAGETYP"),
        ({"IMAGETYP": "Bias Frame"}, "x.fits", "bias", "header:IMAGETYP"),
        ({"IMAGETYP": "Dark"}, "x.fits", "dark", "header:IMAGETYP"),
        ({"IMAGETYP": "DARKFLAT"}, "x.fits", "dark-flat", "header:IMAGETYP"),
        ({}, "Dark_10s/frame_0001.fit", "dark", "filename"),
        ({}, "light_B_15000ms_3.fit", "light", "filename"),
        ({}, "Flat_ASIImg_frame0001.fit", "flat", "filename"),
        ({}, "Bias_ASIImg_frame0001.fit", "bias", "filename"),
    ],
)
def test_kind_from_headers_and_names(cards: dict, name: str, kind: str, source: str) -> None:
    header = fits.Header()
    for k, v in cards.items():
        header[k] = v
    meta = normalise_header(header, Path("/capture") / name, root=Path("/capture"))
    assert meta.kind == kind
    assert meta.sources["kind"] == source


def test_exposure_from_name_is_marked() -> None:
    meta = normalise_header(fits.Header(), Path("/c/light_B_15000ms_3.fit"), root=Path("/c"))
    assert meta.exptime == pytest.approx(15.0)
    assert meta.sources["exptime"] == "filename"


def test_bayer_offsets_shift_the_pattern() -> None:
    header = fits.Header()
    header["BAYERPAT"] = "RGGB"
    header["XBAYROFF"] = 1
    assert normalise_header(header, Path("x.fits")).bayer == "GRBG"
    header["YBAYROFF"] = 1
    assert normalise_header(header, Path("x.fits")).bayer == "BGGR"


def test_journal_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "frames.jsonl"
    path.write_text('{"file": "a.fits"}\n{"file": "b.f')
    journal = JsonlWriter(path)
    journal.append({"file": "c.fits"})
    assert [r["file"] for r in journal.read()] == ["a.fits", "c.fits"]


@pytest.mark.realdata
def test_real_headers(real_data: Path) -> None:
    bias = read_frame(
        real_data / "asi120-calibration/bias/Bias_ASIImg_frame0001.fit", root=real_data
    )
    assert bias.meta.kind == "bias" and bias.meta.sources["kind"] == "filename"
    assert bias.meta.exptime == pytest.approx(6.4e-5)
    assert bias.meta.bayer == "GRBG"
    dark = read_frame(
        real_data / "asi120-calibration/dark-30s/Dark_ASIImg_30sec_frame0001.fit", root=real_data
    )
    assert dark.meta.kind == "dark" and dark.meta.exptime == pytest.approx(30.0)
    osc = read_frame(real_data / "als-m27-osc/Light_1069.fits", root=real_data)
    assert osc.meta.kind == "light" and osc.meta.sources["kind"] == "header:FRAME"
    assert osc.meta.bayer == "RGGB" and osc.data.shape == (976, 1304)
    mono = read_frame(real_data / "jocular-arp186/L_1.fit", root=real_data)
    assert mono.meta.kind == "light" and mono.meta.exptime == pytest.approx(20.0)
    assert mono.meta.bayer is None and mono.data.dtype == np.float32
    assert 0 < float(np.median(mono.data)) < 65535


def test_an_unknown_declared_type_is_not_guessed() -> None:
    header = fits.Header()
    header["IMAGETYP"] = "Test Pattern"
    meta = normalise_header(header, Path("/c/light_0001.fits"), root=Path("/c"))
    assert meta.kind == "unknown"
    assert meta.sources["kind"] == "header:IMAGETYP=Test Pattern"


def test_tile_compressed_fits(tmp_path: Path) -> None:
    data = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) % 3000) + 500
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)])
    hdul[1].header["IMAGETYP"] = "Light Frame"
    hdul[1].header["EXPTIME"] = 30.0
    path = tmp_path / "light.fits.fz"
    hdul.writeto(path)
    frame = read_frame(path)
    assert frame.meta.kind == "light" and frame.meta.exptime == 30.0
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))
    partial = tmp_path / "partial.fits.fz"
    partial.write_bytes(path.read_bytes()[: 2880 + 100])
    with pytest.raises(IncompleteFrame):
        check_complete(partial)


def test_xisf_with_fits_keywords(tmp_path: Path) -> None:
    import xisf

    data = np.random.default_rng(0).integers(400, 3000, (40, 56)).astype(np.uint16)
    keywords = {
        "IMAGETYP": [{"value": "Light Frame", "comment": ""}],
        "EXPTIME": [{"value": "120", "comment": "s"}],
        "FILTER": [{"value": "Ha", "comment": ""}],
        "OBJECT": [{"value": "NGC 7000", "comment": ""}],
    }
    path = tmp_path / "light.xisf"
    xisf.XISF.write(str(path), data[:, :, None], image_metadata={"FITSKeywords": keywords})
    frame = read_frame(path)
    assert frame.meta.kind == "light" and frame.meta.exptime == 120.0
    assert frame.meta.filter == "Ha" and frame.meta.target == "NGC 7000"
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))
    partial = tmp_path / "partial.xisf"
    partial.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(IncompleteFrame):
        check_complete(partial)


def test_tiff_mono_and_rgb(tmp_path: Path) -> None:
    import tifffile

    mono = np.random.default_rng(1).integers(0, 60000, (30, 40)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "Light_0001.tif", mono)
    frame = read_frame(tmp_path / "Light_0001.tif", root=tmp_path)
    assert frame.meta.kind == "light" and frame.meta.sources["kind"] == "filename"
    np.testing.assert_array_equal(frame.data, mono.astype(np.float32))
    rgb = np.random.default_rng(2).integers(0, 60000, (30, 40, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb)
    assert read_frame(tmp_path / "rgb.tiff").data.shape == (30, 40, 3)
    (tmp_path / "short.tif").write_bytes((tmp_path / "Light_0001.tif").read_bytes()[:-300])
    with pytest.raises(IncompleteFrame):
        check_complete(tmp_path / "short.tif")


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "x.cr2").write_bytes(b"\0" * 100)
    with pytest.raises(FrameReadError) as err:
        read_frame(tmp_path / "x.cr2")
    assert err.value.reason == "unsupported format"


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2022-01-25T20:24:01.452", "2022-01-25T20:24:01.452000"),
        ("2022-01-25 20:24:01", "2022-01-25T20:24:01"),
        ("2024-04-16T15:33:10.6230001Z", "2024-04-16T15:33:10.623000"),
        ("2018-09-07", "2018-09-07T00:00:00"),
        ("25/01/98", "1998-01-25T00:00:00"),
    ],
)
def test_dates_as_real_headers_write_them(text: str, iso: str) -> None:
    from subwatch.frames.meta import parse_date

    dt = parse_date(text)
    assert dt is not None and dt.replace(tzinfo=None).isoformat() == iso


def test_garbage_dates_are_none() -> None:
    from subwatch.frames.meta import parse_date

    assert parse_date("yesterday") is None and parse_date("") is None


@pytest.mark.parametrize(
    ("dtype", "bzero"),
    [
        (np.uint8, None),
        (np.int16, None),
        (np.uint16, 32768),
        (np.int32, None),
        (np.float32, None),
        (np.float64, None),
    ],
)
def test_every_fits_pixel_type_reads_to_float32(
    tmp_path: Path, dtype: type, bzero: int | None
) -> None:
    values = np.arange(12 * 16).reshape(12, 16) % 200 + 10
    hdu = fits.PrimaryHDU(values.astype(dtype))
    hdu.header["IMAGETYP"] = "Light Frame"
    path = tmp_path / "f.fits"
    hdu.writeto(path)
    if bzero is not None:
        assert fits.getheader(path)["BZERO"] == bzero
    frame = read_frame(path)
    assert frame.data.dtype == np.float32 and frame.mask is None
    np.testing.assert_array_equal(frame.data, values.astype(np.float32))


@pytest.mark.parametrize(
    ("dtype", "cards"),
    [
        (np.uint8, {}),
        (np.int16, {}),
        (np.uint16, {}),
        (np.int32, {}),
        (np.uint32, {}),
        (np.float32, {}),
        (">f8", {}),
        (np.int16, {"BSCALE": 2.0, "BZERO": 1000.0}),  # scaled: astropy's path
        (np.int16, {"BLANK": -32768}),  # blanks: astropy's path
    ],
)
def test_plain_images_read_banded_to_astropys_values(
    tmp_path: Path, dtype: str, cards: dict[str, float]
) -> None:
    # Tall enough for many bands; the full range of each type, extremes included.
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        values = rng.integers(info.min, info.max, (700, 513), endpoint=True, dtype=np.int64)
        values[0, :2] = info.min, info.max
        values = values.astype(dtype)
    else:
        values = (rng.standard_normal((700, 513)) * 1e4).astype(dtype)
        values[5, 7] = np.nan
    hdu = fits.PrimaryHDU(values, do_not_scale_image_data=bool(cards))
    for key, value in cards.items():
        hdu.header[key] = value
    path = tmp_path / "f.fits"
    hdu.writeto(path)
    expected = np.asarray(fits.getdata(path), dtype=np.float32)
    frame = read_frame(path)
    assert frame.data.dtype == np.float32
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(frame.data[finite], expected[finite])
    assert frame.bad_pixels == int((~finite).sum())


@pytest.mark.realdata
def test_real_fits_read_to_astropys_values(real_data: Path) -> None:
    paths = sorted(real_data.rglob("*.fit")) + sorted(real_data.rglob("*.fits"))
    assert paths
    for path in paths[:: max(1, len(paths) // 12)]:
        expected = np.asarray(fits.getdata(path), dtype=np.float32)
        if expected.ndim != 2:
            continue
        np.testing.assert_array_equal(read_frame(path).data, expected, err_msg=str(path))


def test_rgb_cube_is_channel_last(tmp_path: Path) -> None:
    cube = np.stack([np.full((10, 12), v, np.float32) for v in (1, 2, 3)])
    fits.PrimaryHDU(cube).writeto(tmp_path / "rgb.fits")
    frame = read_frame(tmp_path / "rgb.fits")
    assert frame.data.shape == (10, 12, 3)
    np.testing.assert_array_equal(frame.data[0, 0], [1, 2, 3])


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((7, 5), np.float64), ((1000, 3001), np.float32), ((13, 11, 3), np.float32), ((999,), ">f8")],
)
def test_streamed_fits_are_the_bytes_astropy_writes(
    tmp_path: Path, shape: tuple[int, ...], dtype: str
) -> None:
    """Float images are streamed in chunks (4 MB: the second case takes four); the file must
    be exactly what astropy writes, NaN included."""
    data = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    data.flat[0] = np.nan
    header = fits.Header()
    header["OBJECT"] = "M 42"
    header["EXPTIME"] = 60.0
    write_fits_atomic(tmp_path / "a.fits", data, header)
    expected = io.BytesIO()
    hdu = fits.PrimaryHDU(data=data.astype(np.float32), header=header)
    hdu.writeto(expected, output_verify="silentfix")
    assert (tmp_path / "a.fits").read_bytes() == expected.getvalue()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_file_cut_short_after_its_check_is_incomplete(tmp_path: Path, monkeypatch) -> None:
    """The pixels are read after the size check: a file truncated in between is still
    reported as incomplete (to be retried), never as pixels of zeros."""
    import subwatch.frames.fitsio as fitsio

    path = tmp_path / "cut.fits"
    fits.PrimaryHDU(np.ones((300, 200), np.uint16)).writeto(path)
    checked = fitsio.check_fits_complete

    def check_then_cut(p: Path, max_dimension: int | None = None) -> int:
        need = checked(p, max_dimension)
        with open(p, "r+b") as fh:
            fh.truncate(need // 2)
        return need

    monkeypatch.setattr(fitsio, "check_fits_complete", check_then_cut)
    with pytest.raises(IncompleteFrame):
        read_frame(path)
