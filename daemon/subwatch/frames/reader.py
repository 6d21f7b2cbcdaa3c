"""One entry point for every supported format: is the file complete, and read it.

The format is chosen by the file name's suffix (capture programs always write one); each
format module answers the same two questions from its own header before any pixel is read.
"""

from __future__ import annotations

from pathlib import Path

from subwatch.frames.fitsio import (
    FrameReadError,
    IncompleteFrame,
    LoadedFrame,
    check_fits_complete,
    fits_capture_time,
    read_fits,
)
from subwatch.frames.otherformats import (
    read_tiff,
    read_xisf,
    tiff_expected_size,
    xisf_expected_size,
)

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fz")
XISF_SUFFIXES = (".xisf",)
TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED_SUFFIXES = FITS_SUFFIXES + XISF_SUFFIXES + TIFF_SUFFIXES


def frame_format(path: Path) -> str | None:
    name = Path(path).name.lower()
    if name.endswith(FITS_SUFFIXES):
        return "fits"
    if name.endswith(XISF_SUFFIXES):
        return "xisf"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    return None


def check_complete(path: Path, max_dimension: int | None = None) -> int:
    """Raise ``IncompleteFrame`` while the file is shorter than its header promises."""
    fmt = frame_format(path)
    if fmt == "fits":
        return check_fits_complete(path, max_dimension)
    if fmt == "xisf":
        need = xisf_expected_size(path, max_dimension)
    elif fmt == "tiff":
        need = tiff_expected_size(path, max_dimension)
    else:
        raise FrameReadError("unsupported format", Path(path).suffix or "no suffix")
    have = Path(path).stat().st_size
    if have < need:
        raise IncompleteFrame(have, need)
    return need


def capture_time(path: Path) -> float | None:
    """When the frame was taken (POSIX seconds), if its header says so cheaply; else None."""
    return fits_capture_time(path) if frame_format(path) == "fits" else None


def read_frame(path: Path, *, max_dimension: int = 20000, root: Path | None = None) -> LoadedFrame:
    """Read the first image of any supported file as float32 with normalised metadata."""
    path = Path(path)
    if not path.exists():
        raise FrameReadError("missing", str(path))
    fmt = frame_format(path)
    if fmt == "fits":
        return read_fits(path, max_dimension=max_dimension, root=root)
    if fmt == "xisf":
        return read_xisf(path, max_dimension=max_dimension, root=root)
    if fmt == "tiff":
        return read_tiff(path, max_dimension=max_dimension, root=root)
    raise FrameReadError("unsupported format", path.suffix or "no suffix")
