"""Frames in and out: reading what capture software wrote, and writing our products safely.

A frame arrives as a file of some format with a header of some dialect. ``reader`` answers the
first question a live tool must ask of a file, *is it complete?*, from the header alone (the data
size a FITS, XISF or TIFF header promises is exact), then reads the first image with its header
repaired rather than refused (``fitsio``, ``otherformats``). ``meta`` turns the many header
dialects (N.I.N.A., SharpCap, INDI/Ekos, ASIImg, Jocular) into one ``FrameMeta``, falling back
to file and folder names when headers are silent and saying so. ``outputs`` writes every
product atomically (temp file, fsync, rename) so that a reader or a crash never sees half a
file.
"""

from subwatch.frames.fitsio import (
    FrameReadError,
    IncompleteFrame,
    LoadedFrame,
    expected_fits_size,
)
from subwatch.frames.meta import FrameMeta, normalise_header
from subwatch.frames.outputs import JsonlWriter, atomic_write_bytes, write_fits_atomic
from subwatch.frames.reader import (
    SUPPORTED_SUFFIXES,
    capture_time,
    check_complete,
    frame_format,
    read_frame,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "FrameMeta",
    "FrameReadError",
    "IncompleteFrame",
    "JsonlWriter",
    "LoadedFrame",
    "atomic_write_bytes",
    "capture_time",
    "check_complete",
    "expected_fits_size",
    "frame_format",
    "normalise_header",
    "read_frame",
    "write_fits_atomic",
]
