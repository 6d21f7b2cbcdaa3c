"""The scanner hands out complete files once, in capture order, and ignores what is not ours."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from subwatch.config import WatchConfig
from subwatch.service.scanner import Scanner


def _fits(value: int = 0) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.full((20, 30), value, np.uint16)).writeto(buf)
    return buf.getvalue()


def _cfg(**kw: object) -> WatchConfig:
    base = {"settle_seconds": 1.0, "incomplete_timeout_seconds": 5.0}
    base.update(kw)
    return WatchConfig.model_validate(base)


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_ready_files_in_mtime_order_once(tmp_path: Path) -> None:
    for i, name in enumerate(["c.fits", "a.fits", "b.fit"]):
        (tmp_path / name).write_bytes(_fits(i))
        _age(tmp_path / name, 100 - i)
    scanner = Scanner(tmp_path, _cfg())
    got = scanner.poll()
    assert [c.path.name for c in got] == ["c.fits", "a.fits", "b.fit"]
    assert all(c.state == "ready" for c in got)
    assert scanner.poll() == []  # handed out once
    (tmp_path / "a.fits").write_bytes(_fits(9))  # rewritten: a new version is reported
    _age(tmp_path / "a.fits", 10)
    assert [c.path.name for c in scanner.poll()] == ["a.fits"]


def test_fresh_and_partial_files_wait(tmp_path: Path) -> None:
    payload = _fits()
    (tmp_path / "fresh.fits").write_bytes(payload)  # mtime now: not settled
    (tmp_path / "partial.fits").write_bytes(payload[:3000])
    _age(tmp_path / "partial.fits", 50)
    scanner = Scanner(tmp_path, _cfg())
    now = time.time()
    # Quiet but short: one "waiting" report, so a stuck file shows; nothing handed out.
    assert [(c.path.name, c.state) for c in scanner.poll(now)] == [("partial.fits", "waiting")]
    assert {p.name for p in scanner.pending} == {"fresh.fits", "partial.fits"}
    assert scanner.poll(now + 0.5) == []  # not one report per poll
    # Still short after the timeout of our own watching: incomplete, reported once.
    later = scanner.poll(now + 6.0)
    states = {c.path.name: c.state for c in later}
    assert states == {"fresh.fits": "ready", "partial.fits": "incomplete"}
    assert scanner.poll(now + 7.0) == [] and not scanner.pending


def test_final_pass_reports_partial_files_at_once(tmp_path: Path) -> None:
    (tmp_path / "partial.fits").write_bytes(_fits()[:3000])
    got = Scanner(tmp_path, _cfg()).poll(final=True)
    assert [(c.path.name, c.state) for c in got] == [("partial.fits", "incomplete")]
    assert got[0].reason.startswith("truncated")


def test_ignored_names_and_own_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "M42").mkdir(parents=True)
    names = [".hidden.fits", "~lock.fits", "x.fits.tmp", "y.part", "notes.txt", "ok.FITS"]
    for name in names:
        (tmp_path / name).write_bytes(_fits())
    (out / "M42" / "stack.fits").write_bytes(_fits())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.fts").write_bytes(_fits())
    for p in tmp_path.rglob("*"):
        if p.is_file():
            _age(p, 30)
    got = Scanner(tmp_path, _cfg(), exclude=[out]).poll()
    assert sorted(c.path.name for c in got) == ["deep.fts", "ok.FITS"]
    flat = Scanner(tmp_path, _cfg(recursive=False), exclude=[out]).poll()
    assert [c.path.name for c in flat] == ["ok.FITS"]


def test_a_vanished_watch_folder_is_survived(tmp_path: Path) -> None:
    scanner = Scanner(tmp_path / "unplugged", _cfg())
    assert scanner.poll() == []


def test_capture_order_comes_from_the_header_when_mtimes_tie(tmp_path: Path) -> None:
    """A copied folder: same mtime everywhere; DATE-OBS, then natural names, give the order."""
    dates = {
        "L_10.fits": "2022-01-25T20:30:00",
        "L_2.fits": "2022-01-25T20:20:00",
        "L_1.fits": "2022-01-25T20:10:00",
    }
    for name, date in dates.items():
        hdu = fits.PrimaryHDU(np.zeros((20, 30), np.uint16))
        hdu.header["DATE-OBS"] = date
        hdu.writeto(tmp_path / name)
    for name in ("x_10.fits", "x_9.fits"):  # no DATE-OBS: natural name order
        (tmp_path / name).write_bytes(_fits())
    for p in tmp_path.iterdir():
        os.utime(p, (1.0e9, 1.0e9))
    got = [c.path.name for c in Scanner(tmp_path, _cfg()).poll()]
    assert got == ["x_9.fits", "x_10.fits", "L_1.fits", "L_2.fits", "L_10.fits"]


def test_reported_paths_are_looked_at_without_walking(tmp_path: Path) -> None:
    """An observer's paths (and pending files) are checked; other files wait for a rescan."""
    (tmp_path / "night").mkdir()
    for name in ("a.fits", "night/b.fits", "night/c.fits", "other.fits"):
        (tmp_path / name).write_bytes(_fits())
        _age(tmp_path / name, 30)
    scanner = Scanner(tmp_path, _cfg())
    got = scanner.poll(paths=[tmp_path / "a.fits", tmp_path / "night", tmp_path / "gone.fits"])
    assert sorted(c.path.name for c in got) == ["a.fits", "b.fits", "c.fits"]
    assert [c.path.name for c in scanner.poll()] == ["other.fits"]  # the rescan finds the rest


def test_a_deferred_file_comes_back_with_its_identity(tmp_path: Path) -> None:
    (tmp_path / "a.fits").write_bytes(_fits(3))
    _age(tmp_path / "a.fits", 30)
    scanner = Scanner(tmp_path, _cfg())
    (first,) = scanner.poll()
    assert first.fingerprint
    scanner.defer(first)
    (again,) = scanner.poll(paths=[])
    assert again is first  # not read again
    assert scanner.poll(paths=[]) == []


def _completing_on_first_check(monkeypatch, path: Path, rest: bytes) -> None:
    """The capture program finishes ``path`` while the scanner checks it for the first time."""
    from subwatch.service import scanner as scanner_module

    real = scanner_module.check_complete
    calls = []

    def check_complete(p: Path, *args: object) -> int:
        calls.append(p)
        if len(calls) == 1:
            try:
                return real(p, *args)
            finally:
                with open(path, "ab") as fh:
                    fh.write(rest)
                _age(path, 20)
        return real(p, *args)

    monkeypatch.setattr(scanner_module, "check_complete", check_complete)


def test_a_file_reported_with_its_folder_is_considered_once(tmp_path: Path, monkeypatch) -> None:
    """A night's folder and its first sub reported together, the sub completed meanwhile: one
    report (waiting), then the complete file with its own size; never both in one pass."""
    payload = _fits(5)
    night = tmp_path / "night"
    night.mkdir()
    sub = night / "a.fits"
    sub.write_bytes(payload[:3000])
    _age(sub, 30)
    _completing_on_first_check(monkeypatch, sub, payload[3000:])
    scanner = Scanner(tmp_path, _cfg())
    got = scanner.poll(paths=[night, sub])
    assert [(c.path.name, c.state) for c in got] == [("a.fits", "waiting")]
    (ready,) = scanner.poll(paths=[])
    assert (ready.state, ready.size) == ("ready", len(payload))


def test_a_file_written_while_checked_is_handed_out_with_its_final_size(
    tmp_path: Path, monkeypatch
) -> None:
    """Seen empty, complete by the time it is read: not handed out as the empty version."""
    payload = _fits(6)
    sub = tmp_path / "a.fits"
    sub.write_bytes(b"")
    _age(sub, 30)

    from subwatch.service import scanner as scanner_module

    real = scanner_module.check_complete

    def check_complete(p: Path, *args: object) -> int:
        if sub.stat().st_size == 0:
            sub.write_bytes(payload)
            _age(sub, 20)
        return real(p, *args)

    monkeypatch.setattr(scanner_module, "check_complete", check_complete)
    scanner = Scanner(tmp_path, _cfg())
    assert scanner.poll() == [] and scanner.pending == {sub}
    (ready,) = scanner.poll(paths=[])
    assert (ready.state, ready.size, ready.mtime) == ("ready", len(payload), sub.stat().st_mtime)
