"""Atomic writes: a product is either the old complete file or the new complete file.

Users point image viewers, web pages and scripts at our outputs while the night goes on, and a
power cut can come at any moment; writing to a temporary name in the same folder, fsyncing it and
renaming it over the target is the one POSIX sequence that guarantees readers never see a torn
file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from astropy.io import fits

from subwatch.frames.fitsio import BLOCK


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is never seen half written."""
    atomic_write_with(path, lambda fh: fh.write(payload))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then fsync it and rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some filesystems refuse, which is harmless."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


#: Rows converted to big-endian per write when streaming float images (about 4 MB at a time).
_STREAM_BYTES = 4 << 20


def write_fits_atomic(path: Path, data: np.ndarray, header: fits.Header | None = None) -> None:
    """Write a FITS image atomically; float data is stored as float32 (the contract).

    Float images are streamed: the header that astropy would write, then the pixels converted
    to big-endian a few MB at a time, then the padding. The bytes are the same as astropy's
    ``writeto``, without its in-memory copy of the whole file (at 26 MP two 100 MB copies,
    each a fresh allocation, were most of the time a preview spent writing its FITS).
    """
    arr = np.asarray(data)
    if arr.dtype.kind != "f":
        hdu = fits.PrimaryHDU(data=arr, header=header)
        buf = io.BytesIO()
        hdu.writeto(buf, output_verify="silentfix")
        atomic_write_bytes(path, buf.getvalue())
        return
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    hdu = fits.PrimaryHDU(data=arr, header=header)
    hdu.verify("silentfix")
    head = hdu.header.tostring().encode("ascii")
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
    rows = max(1, _STREAM_BYTES // max(flat[0].nbytes, 1))

    def write(fh: BinaryIO) -> None:
        fh.write(head)
        chunk = np.empty((min(rows, flat.shape[0]), flat.shape[1]), ">f4")
        for start in range(0, flat.shape[0], rows):
            part = flat[start : start + rows]
            out = chunk[: len(part)]
            out[...] = part
            fh.write(memoryview(out).cast("B"))
        fh.write(bytes(-arr.nbytes % BLOCK))

    atomic_write_with(path, write)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write a JSON document atomically (status files are polled by pages and scripts)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class JsonlWriter:
    """Append-only JSON-lines journal; each line is flushed and fsynced as it is written.

    A line is the unit of durability: after a crash the file ends with complete lines only,
    except possibly one torn last line, which readers skip.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Terminate a torn last line so the next record starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_json_default, allow_nan=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def size(self) -> int:
        """Bytes written so far: the offset a checkpoint records."""
        with self._lock:
            return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> int:
        """Cut the journal back to ``offset`` bytes (a checkpoint's); returns the rows dropped."""
        with self._lock:
            if not self.path.exists():
                return 0
            with open(self.path, "rb+") as fh:
                fh.seek(offset)
                dropped = fh.read().count(b"\n")
                fh.truncate(offset)
                fh.flush()
                os.fsync(fh.fileno())
            return dropped

    def read(self) -> list[dict[str, Any]]:
        """All complete records, skipping a torn or corrupt line rather than failing."""
        return read_jsonl(self.path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                records.append(obj)
    return records
