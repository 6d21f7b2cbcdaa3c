"""FITS files the way capture programs write them, including the way they appear on disk.

Pixels are unsigned 16-bit, stored as FITS requires: signed 16-bit with BZERO = 32768. The
keywords are the ones N.I.N.A., SGP and their kin write (IMAGETYP spelled ``Light Frame``,
``Flat Field``..., GAIN and OFFSET as the camera's settings with EGAIN the e-/ADU, CCD-TEMP
next to SET-TEMP), because a pipeline is only as good as its reading of real headers.

Capture programs create the final file name and then stream into it, so a watcher can see a
file that exists but is not complete. ``write_chunked`` reproduces that: the whole file is
built in memory first, then written header first and data in pieces, with flushes and pauses
in between. Modification times are set to the end of each exposure so that "by mtime" and
"in capture order" agree, as they do for files copied off an acquisition computer.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

IMAGETYP = {
    "light": "Light Frame",
    "bias": "Bias Frame",
    "dark": "Dark Frame",
    "flat": "Flat Field",
}
SOFTWARE = "subwatch simulate"
BLOCK = 2880


def iso(moment: datetime) -> str:
    """ISO 8601 with milliseconds and no zone, as DATE-OBS is written (UTC by convention)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def sexagesimal(value: float, hours: bool) -> str:
    """'05 35 17.30' / '-05 23 28.0' as OBJCTRA / OBJCTDEC are written."""
    sign = "-" if value < 0 else ("+" if not hours else "")
    v = abs(value) / 15.0 if hours else abs(value)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60.0) * 3600.0
    return f"{sign}{d:02d} {m:02d} {s:05.2f}" if hours else f"{sign}{d:02d} {m:02d} {s:04.1f}"


def frame_header(
    kind: str,
    *,
    exptime: float,
    start: datetime,
    ccd_temp: float,
    set_temp: float,
    gain_setting: int,
    offset_setting: int,
    egain: float,
    instrument: str,
    pixel_um: float,
    focal_mm: float,
    telescope: str,
    filter_name: str | None = None,
    target: str | None = None,
    ra_deg: float | None = None,
    dec_deg: float | None = None,
    pierside: str | None = None,
    bayer: str | None = None,
) -> fits.Header:
    """The keywords of one frame; the mandatory structural ones are added by astropy."""
    h = fits.Header()
    h["IMAGETYP"] = (IMAGETYP[kind], "Type of exposure")
    h["EXPOSURE"] = (float(exptime), "[s] Exposure duration")
    h["EXPTIME"] = (float(exptime), "[s] Exposure duration")
    h["DATE-OBS"] = (iso(start), "Time of observation (UTC)")
    h["XBINNING"] = (1, "X axis binning factor")
    h["YBINNING"] = (1, "Y axis binning factor")
    h["GAIN"] = (int(gain_setting), "Sensor gain")
    h["OFFSET"] = (int(offset_setting), "Sensor gain offset")
    h["EGAIN"] = (round(float(egain), 4), "[e-/ADU] Electrons per A/D unit")
    h["XPIXSZ"] = (float(pixel_um), "[um] Pixel X axis size")
    h["YPIXSZ"] = (float(pixel_um), "[um] Pixel Y axis size")
    h["INSTRUME"] = (instrument, "Imaging instrument name")
    h["SET-TEMP"] = (float(set_temp), "[degC] CCD temperature setpoint")
    h["CCD-TEMP"] = (float(ccd_temp), "[degC] CCD temperature")
    h["READOUTM"] = ("Normal", "Sensor readout mode")
    if bayer:
        h["BAYERPAT"] = (bayer, "Sensor Bayer pattern")
        h["XBAYROFF"] = (0, "Bayer pattern X axis offset")
        h["YBAYROFF"] = (0, "Bayer pattern Y axis offset")
    h["ROWORDER"] = ("TOP-DOWN", "FITS Image Orientation")
    h["TELESCOP"] = (telescope, "Name of telescope")
    h["FOCALLEN"] = (float(focal_mm), "[mm] Focal length")
    if filter_name and kind in ("light", "flat"):
        h["FILTER"] = (filter_name, "Active filter name")
    if kind == "light":
        if target:
            h["OBJECT"] = (target, "Name of the object of interest")
        if ra_deg is not None and dec_deg is not None:
            h["RA"] = (round(ra_deg, 6), "[deg] RA of telescope")
            h["DEC"] = (round(dec_deg, 6), "[deg] Declination of telescope")
            h["OBJCTRA"] = (sexagesimal(ra_deg, hours=True), "[H M S] RA of imaged object")
            h["OBJCTDEC"] = (sexagesimal(dec_deg, hours=False), "[D M S] Declination")
        if pierside:
            h["PIERSIDE"] = (pierside, "Telescope pointing state")
    h["SWCREATE"] = (SOFTWARE, "Software that created this file")
    return h


def fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    """The complete file in memory: uint16 data become BITPIX 16 with BZERO 32768."""
    if data.dtype == np.uint16:
        hdu = fits.PrimaryHDU(data=data, header=header, uint=True)
    else:
        hdu = fits.PrimaryHDU(data=data, header=header)
    buf = io.BytesIO()
    hdu.writeto(buf, output_verify="exception")
    return buf.getvalue()


def header_length(payload: bytes) -> int:
    """Bytes taken by the primary header (up to and including its END block)."""
    pos = 0
    while pos + BLOCK <= len(payload):
        block = payload[pos : pos + BLOCK]
        pos += BLOCK
        for i in range(0, BLOCK, 80):
            if block[i : i + 8] == b"END     ":
                return pos
    return len(payload)


def write_file(path: Path, payload: bytes, mtime: float | None = None) -> None:
    """Write a whole file at once and date it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def write_chunked(
    path: Path,
    payload: bytes,
    *,
    chunks: int = 4,
    pause: float = 0.05,
    mtime: float | None = None,
    on_chunk: Callable[[Path, int], None] | None = None,
) -> None:
    """Write ``payload`` under its final name: header first, then data in ``chunks`` pieces.

    Each piece is flushed to the operating system and followed by ``pause`` seconds, so a
    reader polling the folder finds the file present but short, as with a real capture.
    ``on_chunk(path, bytes_written)`` is called after each flush (tests use it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    head = header_length(payload)
    bounds = [0, head, *np.linspace(head, len(payload), chunks + 1)[1:].astype(int).tolist()]
    with open(path, "wb") as fh:
        for k in range(len(bounds) - 1):
            fh.write(payload[bounds[k] : bounds[k + 1]])
            fh.flush()
            if on_chunk is not None:
                on_chunk(path, bounds[k + 1])
            if k < len(bounds) - 2 and pause > 0:
                time.sleep(pause)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def epoch(moment: datetime) -> float:
    """POSIX time of a naive UTC datetime."""
    return moment.replace(tzinfo=UTC).timestamp()
