"""Reading FITS frames: completeness from the header, pixels from the first image, never a crash.

Capture programs create the final file name first and fill it afterwards, so the existence of a
file says nothing. A FITS header, however, states exactly how many data bytes follow it
(|BITPIX|/8 x GCOUNT x (PCOUNT + NAXIS1 x ... x NAXISn), padded to 2880-byte blocks), so a file
shorter than that is *incomplete* and must be retried later, not read. That check costs one small
read and happens before any pixel is touched, as does the refusal of absurd dimensions.

Headers in the wild break the standard (decimal commas, bad DATE cards, lowercase keys), so the
header is repaired with astropy's ``verify('silentfix')`` and read leniently rather than refused.
NaN and Inf pixels are replaced and reported in a mask instead of propagating into the stack.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.utils.exceptions import AstropyUserWarning

from subwatch.frames.meta import FrameMeta, normalise_header, parse_date
from subwatch.rowbands import for_row_bands

BLOCK = 2880
CARD = 80


class FrameReadError(Exception):
    """A frame that cannot be used; ``reason`` is the short code written to frames.jsonl."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class IncompleteFrame(FrameReadError):
    """The file is shorter than its header promises: still being written, or truncated."""

    def __init__(self, have: int, need: int | None) -> None:
        detail = f"{have} of {need} bytes" if need else f"{have} bytes, header not complete"
        super().__init__("incomplete", detail)
        self.have = have
        self.need = need


@dataclass
class LoadedFrame:
    """Pixels as float32 (H, W) or (H, W, 3), the header as found, and normalised metadata.

    ``mask`` (H, W), True where the file held NaN or Inf: those pixels were filled with the
    median so that measurement works, and must be kept out of any stack.
    """

    data: np.ndarray
    header: fits.Header
    meta: FrameMeta
    mask: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bad_pixels:
            self.notes.append(f"{self.bad_pixels} NaN/Inf pixels masked")

    @property
    def bad_pixels(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())


def _parse_header_block(raw: bytes, start: int) -> tuple[dict[str, str], int] | None:
    """Parse one header from ``start``; returns (cards, offset after header) or None if short."""
    cards: dict[str, str] = {}
    pos = start
    while True:
        block = raw[pos : pos + BLOCK]
        if len(block) < BLOCK:
            return None
        pos += BLOCK
        for i in range(0, BLOCK, CARD):
            card = block[i : i + CARD].decode("ascii", errors="replace")
            key = card[:8].strip().upper()
            if key == "END":
                return cards, pos
            if card[8:10] == "= " and key not in cards:
                value = card[10:].split("/", 1)[0].strip().strip("'").strip()
                cards[key] = value
        if pos - start > BLOCK * 2000:  # a header of 72000 cards is not a header
            raise FrameReadError("not a FITS file", "no END card")


def _int_card(cards: dict[str, str], key: str, default: int | None = None) -> int:
    value = cards.get(key)
    if value is None:
        if default is None:
            raise FrameReadError("bad header", f"missing {key}")
        return default
    try:
        return int(float(value.replace(",", ".")))
    except ValueError as exc:
        raise FrameReadError("bad header", f"{key} = {value!r}") from exc


def _data_bytes(cards: dict[str, str]) -> int:
    bitpix = _int_card(cards, "BITPIX")
    if bitpix not in (8, 16, 32, 64, -32, -64):
        raise FrameReadError("bad header", f"BITPIX = {bitpix}")
    naxis = _int_card(cards, "NAXIS")
    if naxis == 0:
        return 0
    if naxis < 0 or naxis > 999:
        raise FrameReadError("bad header", f"NAXIS = {naxis}")
    axes = [_int_card(cards, f"NAXIS{i}") for i in range(1, naxis + 1)]
    if any(a < 0 for a in axes):
        raise FrameReadError("bad header", f"negative axis length {axes}")
    gcount = _int_card(cards, "GCOUNT", 1)
    pcount = _int_card(cards, "PCOUNT", 0)
    nbytes = abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))
    return -(-nbytes // BLOCK) * BLOCK


def expected_fits_size(path: Path, *, max_dimension: int | None = None) -> int:
    """Bytes a complete file must have, from its headers alone.

    Raises ``IncompleteFrame`` while a header is still being written, ``FrameReadError`` for a
    file that is not FITS. Extensions are followed while the file holds their headers; a
    primary HDU without data and no extension yet (a tile-compressed file mid-write) counts as
    incomplete.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(BLOCK * 64)
    if not raw[:9].startswith(b"SIMPLE  ="):
        if len(raw) < 9:
            raise IncompleteFrame(size, None)
        raise FrameReadError("not a FITS file", "no SIMPLE card")
    offset = 0
    parsed = _parse_header_block(raw, 0)
    if parsed is None:
        raise IncompleteFrame(size, None)
    cards, after = parsed
    if max_dimension is not None:
        _check_header_dimensions(cards, max_dimension)
    offset = after + _data_bytes(cards)
    primary_empty = _int_card(cards, "NAXIS") == 0
    seen_image = not primary_empty
    # Follow extensions whose headers are already on disk (needs the bytes at that offset).
    while offset < size and offset + BLOCK <= size:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read(BLOCK * 64)
        if not chunk.startswith(b"XTENSION="):
            break
        parsed = _parse_header_block(chunk, 0)
        if parsed is None:
            raise IncompleteFrame(size, None)
        ext_cards, ext_after = parsed
        if max_dimension is not None and ext_cards.get("XTENSION", "").upper() != "BINTABLE":
            _check_header_dimensions(ext_cards, max_dimension)
        offset += ext_after + _data_bytes(ext_cards)
        seen_image = True
    if not seen_image:
        raise IncompleteFrame(size, None)
    return offset


def refuse_oversized(width: int, height: int, max_dimension: int | None) -> None:
    """Refuse a promised image larger than ``max_dimension`` a side before waiting or reading."""
    if max_dimension is not None and max(width, height) > max_dimension:
        raise FrameReadError(
            "absurd dimensions", f"{width}x{height} exceeds {max_dimension} px a side"
        )


def _check_header_dimensions(cards: dict[str, str], max_dimension: int) -> None:
    naxis = _int_card(cards, "NAXIS", 0)
    if naxis >= 2:
        refuse_oversized(
            _int_card(cards, "NAXIS1", 0), _int_card(cards, "NAXIS2", 0), max_dimension
        )


def fits_capture_time(path: Path) -> float | None:
    """DATE-OBS (or DATE-STA, DATE-END) of the primary header as a POSIX time, from one read.

    Copied folders give every file the same mtime; the header still knows the capture order.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(BLOCK * 8)
        parsed = _parse_header_block(raw, 0)
    except (OSError, FrameReadError):
        return None
    if parsed is None:
        return None
    cards = parsed[0]
    for key in ("DATE-OBS", "DATE-STA", "DATE-END", "DATE-BEG"):
        dt = parse_date(cards.get(key))
        if dt is not None:
            return dt.timestamp()
    return None


def check_fits_complete(path: Path, max_dimension: int | None = None) -> int:
    """Raise ``IncompleteFrame`` if the file is shorter than its headers promise; else its size."""
    need = expected_fits_size(path, max_dimension=max_dimension)
    have = Path(path).stat().st_size
    if have < need:
        raise IncompleteFrame(have, need)
    return need


def _first_image_hdu(hdul: fits.HDUList) -> fits.hdu.base._BaseHDU:
    for hdu in hdul:
        is_image = isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)
        if is_image and hdu.header.get("NAXIS", 0) >= 2:
            return hdu
    raise FrameReadError("no image", "no image HDU with two or more axes")


def _repair(hdu: fits.hdu.base._BaseHDU) -> list[str]:
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdu.verify("silentfix+ignore")
        except Exception as exc:  # verify itself can choke on truly broken cards
            notes.append(f"header verify: {exc}")
    notes.extend(str(w.message).splitlines()[0] for w in caught if w.message)
    return notes


def read_fits(path: Path, *, max_dimension: int = 20000, root: Path | None = None) -> LoadedFrame:
    """Read the first image of a FITS file as float32, refusing what cannot be a sub.

    ``root`` is the watch folder; folder names under it are used as hints for the metadata.
    """
    path = Path(path)
    if not path.exists():
        raise FrameReadError("missing", str(path))
    check_fits_complete(path, max_dimension)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            warnings.simplefilter("ignore", AstropyUserWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                hdu = _first_image_hdu(hdul)
                notes = _repair(hdu)
                header = hdu.header.copy()
                shape = tuple(
                    int(header.get(f"NAXIS{i}", 0)) for i in range(1, header["NAXIS"] + 1)
                )
                _check_dimensions(shape, max_dimension)
                plain = _read_plain_image(path, hdu, header)
                data = hdu.data if plain is None else plain
    except FrameReadError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise FrameReadError("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if data is None:
        raise FrameReadError("no image", "empty data")
    if plain is not None and header["BITPIX"] > 0:
        image, mask = plain, None  # integers cannot be NaN
    else:
        planes = np.asarray(data)
        if planes.ndim == 3:  # FITS cubes are (planes, rows, cols); we work channel-last
            planes = planes[0] if planes.shape[0] == 1 else np.moveaxis(planes, 0, -1)
        image, mask = to_float_image(planes)
    meta = normalise_header(header, path, root=root, shape=image.shape)
    return LoadedFrame(data=image, header=header, meta=meta, mask=mask, notes=notes)


#: (BITPIX, BZERO) of the images read without astropy's data path: what cameras write (16-bit
#: unsigned as signed with BZERO 32768, 8-bit, 32-bit integers, float), with the dtype on disk.
_PLAIN_LAYOUTS = {
    (8, 0.0): "u1",
    (16, 0.0): ">i2",
    (16, 32768.0): ">i2",
    (32, 0.0): ">i4",
    (32, 2147483648.0): ">i4",
    (-32, 0.0): ">f4",
    (-64, 0.0): ">f8",
}


def _read_plain_image(
    path: Path, hdu: fits.hdu.base._BaseHDU, header: fits.Header
) -> np.ndarray | None:
    """A plain 2D image straight from the file into float32, on all cores; None otherwise.

    astropy reads the data into one array, converts it to native unsigned integers in
    another, and ``to_float_image`` makes a third: 0.13 s for a 26 MP sub in the page cache.
    Here each band of rows is read with ``pread`` and converted while it is in cache (0.05 s),
    to exactly the values astropy gives (integers are exact in float32 up to 2^24, larger
    ones are rounded once either way; tests/test_frames.py compares them). Anything unusual
    (scaling, BLANK, cubes, compression, an extension) takes astropy's path.
    """
    if type(hdu) not in (fits.PrimaryHDU, fits.ImageHDU) or header.get("NAXIS") != 2:
        return None
    try:
        bitpix = int(header["BITPIX"])
        bzero = float(header.get("BZERO", 0.0))
        bscale = float(header.get("BSCALE", 1.0))
    except (KeyError, TypeError, ValueError):
        return None
    layout = _PLAIN_LAYOUTS.get((bitpix, bzero))
    if layout is None or bscale != 1.0 or "BLANK" in header:
        return None
    width, height = int(header["NAXIS1"]), int(header["NAXIS2"])
    offset = int(hdu.fileinfo()["datLoc"])
    disk = np.dtype(layout)
    row = width * disk.itemsize
    image = np.empty((height, width), np.float32)
    # Sums in float32 for 8 and 16 bits (exact), float64 for 32-bit integers (rounded once).
    shift = np.float32(bzero) if abs(bitpix) < 32 else np.float64(bzero)
    fd = os.open(path, os.O_RDONLY)
    try:

        def band(rows: slice) -> None:
            size = (rows.stop - rows.start) * row
            raw = os.pread(fd, size, offset + rows.start * row)
            if len(raw) != size:  # cut short since its completeness was checked
                raise IncompleteFrame(os.fstat(fd).st_size, offset + height * row)
            values = np.frombuffer(raw, disk).reshape(-1, width)
            if bitpix < 0:
                np.copyto(image[rows], values)
            else:
                np.add(values, shift, out=image[rows])

        for_row_bands(band, height, width * 4)
    finally:
        os.close(fd)
    return image


def _check_dimensions(shape: tuple[int, ...], max_dimension: int) -> None:
    """Refuse before allocating: a corrupt NAXIS can ask for terabytes."""
    if len(shape) < 2:
        raise FrameReadError("no image", f"NAXIS = {len(shape)}")
    w, h = shape[0], shape[1]
    if w < 8 or h < 8:
        raise FrameReadError("absurd dimensions", f"{w}x{h}")
    if w > max_dimension or h > max_dimension:
        raise FrameReadError("absurd dimensions", f"{w}x{h} exceeds {max_dimension} px a side")
    if len(shape) > 3 or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise FrameReadError("unsupported image", f"axes {shape}")


def to_float_image(data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (H, W) or (H, W, 3), and the (H, W) mask of NaN/Inf pixels (None if none).

    Bad pixels are filled with the median of the good ones, so measurement and warping see a
    plausible value; the mask is what keeps them out of the stack.
    """
    arr = np.ascontiguousarray(data, dtype=np.float32)
    if np.asarray(data).dtype.kind in "iub":
        return arr, None  # integers cannot be NaN
    finite = np.isfinite(arr)
    if finite.all():
        return arr, None
    if not finite.any():
        raise FrameReadError("no valid pixels", "every pixel is NaN or Inf")
    arr = arr.copy() if np.shares_memory(arr, data) else arr
    arr[~finite] = np.median(arr[finite])
    bad = ~finite if arr.ndim == 2 else ~finite.all(axis=2)
    return arr, bad
