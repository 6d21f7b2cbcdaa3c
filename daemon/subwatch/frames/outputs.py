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
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is never seen half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
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


def write_fits_atomic(path: Path, data: np.ndarray, header: fits.Header | None = None) -> None:
    """Write a FITS image atomically; float data is stored as float32 (the contract)."""
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    hdu = fits.PrimaryHDU(data=arr, header=header)
    buf = io.BytesIO()
    hdu.writeto(buf, output_verify="silentfix")
    atomic_write_bytes(path, buf.getvalue())


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
