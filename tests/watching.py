"""Helpers for the watching tests: the real daemon in a thread over a temporary folder."""

from __future__ import annotations

import functools
import io
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.daemon import Daemon, RunSummary

NIGHT = datetime(2024, 1, 1, 20, 0, 0)
WAIT = 30.0  # seconds to wait for something that should happen within a second or two


@functools.cache
def _bias_template(size: int) -> bytes:
    rng = np.random.default_rng(size)
    hdu = fits.PrimaryHDU(rng.integers(480, 520, (size, size)).astype(np.uint16))
    hdu.header["IMAGETYP"] = "Bias Frame"
    hdu.header["EXPTIME"] = 0.0
    hdu.header["DATE-OBS"] = NIGHT.isoformat()
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def bias_bytes(index: int, size: int = 32) -> bytes:
    """A small bias frame whose DATE-OBS (30 s apart) and first pixels differ with ``index``."""
    payload = bytearray(_bias_template(size))
    at = payload.index(NIGHT.isoformat().encode())
    date = (NIGHT + timedelta(seconds=30 * index)).isoformat().encode()
    payload[at : at + len(date)] = date
    payload[2880:2884] = index.to_bytes(4, "big")
    return bytes(payload)


def watch_config(watch: Path, out: Path, **watch_keys: Any) -> Config:
    keys = {
        "path": str(watch),
        "settle_seconds": 0.2,
        "poll_seconds": 0.1,
        "rescan_seconds": 3600.0,  # events alone must do the work unless a test says otherwise
        "incomplete_timeout_seconds": 30.0,
        **watch_keys,
    }
    return Config.model_validate({"watch": keys, "output": {"path": str(out)}})


def json_lines(path: Path) -> list[Any]:
    """The JSON lines of a file a daemon may be appending to (none if it does not exist yet).

    A last line without its newline is still being written (a reader can see part of an
    append) and is left out; any other line that is not JSON fails the test.
    """
    if not path.exists():
        return []
    *complete, _being_written = path.read_text().split("\n")
    return [json.loads(x) for x in complete if x.strip()]


def rows(out: Path) -> list[dict[str, Any]]:
    """The journal's rows so far."""
    return json_lines(out / "frames.jsonl")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Running:
    """``with Running(cfg) as d:`` the daemon watches until the block ends, then stops."""

    def __init__(self, cfg: Config, **options: Any) -> None:
        options.setdefault("serve_http", False)
        self.daemon = Daemon(cfg, **options)
        self.out = Path(cfg.output.path)
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="daemon-under-test")

    def _run(self) -> None:
        try:
            self.summary = self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Running:
        self._thread.start()
        wait_until(
            lambda: self.daemon.feeder is not None and self.daemon.feeder.first_pass.is_set(),
            "the start-up scan",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop()
        self._thread.join(timeout=WAIT)
        assert not self._thread.is_alive(), "the daemon did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error

    def rows(self) -> list[dict[str, Any]]:
        return rows(self.out)

    def wait_for_file(self, name: str, status: str | None = None) -> dict[str, Any]:
        """The last row of ``name`` once one (with ``status``, if given) is written."""

        def found() -> list[dict[str, Any]]:
            return [
                r
                for r in self.rows()
                if r["file"] == name and (status is None or r["status"] == status)
            ]

        wait_until(lambda: bool(found()), f"a row for {name}")
        return found()[-1]
