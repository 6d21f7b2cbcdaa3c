"""XISF (PixInsight) and TIFF frames, read into the same ``LoadedFrame`` as FITS.

Both formats say where their pixels lie before any pixel is read: an XISF header (an XML
document after a 16-byte preamble) gives each image's attachment offset and size, and a TIFF's
strip or tile offsets and byte counts do the same. A file shorter than the end of its last data
block is incomplete, exactly as for FITS. XISF carries FITS keywords, so its metadata goes
through the same normaliser; TIFF carries none that capture programs agree on, so file and
folder names are its only hints.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from subwatch.frames.fitsio import (
    FrameReadError,
    IncompleteFrame,
    LoadedFrame,
    _check_dimensions,
    refuse_oversized,
    to_float_image,
)
from subwatch.frames.meta import normalise_header

XISF_SIGNATURE = b"XISF0100"


def _xisf_open(path: Path):
    import xisf

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 16:
        raise IncompleteFrame(size, None)
    if head[:8] != XISF_SIGNATURE:
        raise FrameReadError("not an XISF file", "bad signature")
    (header_len,) = struct.unpack("<I", head[8:12])
    if size < 16 + header_len:
        raise IncompleteFrame(size, 16 + header_len)
    try:
        return xisf.XISF(str(path))
    except Exception as exc:
        raise FrameReadError("unreadable", f"XISF header: {exc}") from exc


def xisf_expected_size(path: Path, max_dimension: int | None = None) -> int:
    doc = _xisf_open(path)
    images = doc.get_images_metadata()
    if not images:
        raise FrameReadError("no image", "XISF file holds no image")
    end = 0
    for meta in images:
        width, height, _ = meta["geometry"]
        refuse_oversized(width, height, max_dimension)
        location = meta["location"]
        if location[0] == "attachment":  # ('attachment', position, size); inline data has none
            end = max(end, int(location[1]) + int(location[2]))
    return end


def tiff_expected_size(path: Path, max_dimension: int | None = None) -> int:
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            refuse_oversized(page.shape[1], page.shape[0], max_dimension)
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)]
    except FrameReadError:
        raise
    except Exception as exc:
        if size < 4096:
            raise IncompleteFrame(size, None) from exc
        raise FrameReadError("unreadable", f"TIFF: {exc}") from exc
    return max(ends) if ends else size


def read_xisf(path: Path, *, max_dimension: int, root: Path | None) -> LoadedFrame:
    need = xisf_expected_size(path, max_dimension)
    have = path.stat().st_size
    if have < need:
        raise IncompleteFrame(have, need)
    doc = _xisf_open(path)
    meta0 = doc.get_images_metadata()[0]
    width, height, channels = meta0["geometry"]
    _check_dimensions((width, height) + ((channels,) if channels > 1 else ()), max_dimension)
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, values in (meta0.get("FITSKeywords") or {}).items():
            if values and key not in ("SIMPLE", "BITPIX", "END") and not key.startswith("NAXIS"):
                try:
                    header[key[:8]] = (values[0].get("value"), values[0].get("comment", ""))
                except (ValueError, KeyError, TypeError):
                    continue
    try:
        data = doc.read_image(0, data_format="channels_last")
    except Exception as exc:
        raise FrameReadError("unreadable", f"XISF data: {exc}") from exc
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.dtype.kind == "f" and float(np.nanmax(data)) <= 1.0:
        # PixInsight stores normalised [0, 1] floats; bring them to the 16-bit ADU scale.
        data = data * 65535.0
    image, mask = to_float_image(data)
    header["NAXIS1"], header["NAXIS2"] = image.shape[1], image.shape[0]
    meta = normalise_header(header, path, root=root, shape=image.shape)
    return LoadedFrame(data=image, header=header, meta=meta, mask=mask)


def read_tiff(path: Path, *, max_dimension: int, root: Path | None) -> LoadedFrame:
    import tifffile

    need = tiff_expected_size(path, max_dimension)
    have = path.stat().st_size
    if have < need:
        raise IncompleteFrame(have, need)
    try:
        data = tifffile.imread(path)
    except Exception as exc:
        raise FrameReadError("unreadable", f"TIFF: {exc}") from exc
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[2] not in (3, 4):
        data = np.moveaxis(data, 0, -1)
    if data.ndim == 3 and data.shape[2] == 4:
        data = data[:, :, :3]  # alpha carries no light
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    _check_dimensions((data.shape[1], data.shape[0], *data.shape[2:]), max_dimension)
    if data.dtype == np.uint8:
        data = data.astype(np.float32) * 257.0  # 8-bit to the 16-bit ADU scale
    image, mask = to_float_image(data)
    header = fits.Header()
    meta = normalise_header(header, path, root=root, shape=image.shape)
    return LoadedFrame(data=image, header=header, meta=meta, mask=mask)
