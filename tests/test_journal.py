"""Exactly once across restarts: a touched file is skipped, a renamed one is a duplicate, a
changed one is reported; checkpoints written before fingerprints existed still load."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.daemon import run_daemon
from subwatch.service.ledger import Ledger, fingerprint
from subwatch.simulate import SimOptions, simulate_session
from watching import rows


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    capture = tmp_path_factory.mktemp("night")
    simulate_session(
        SimOptions(out=capture, lights=4, width=256, height=256, seed=21, calibration=False)
    )
    return capture


@pytest.fixture
def stacked(night: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the night, processed once: (capture folder, output folder)."""
    capture = tmp_path / "capture"
    shutil.copytree(night, capture)
    out = tmp_path / "out"
    _run(capture, out)
    assert _ncombine(out) == 4
    return capture, out


def _run(capture: Path, out: Path) -> None:
    cfg = Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}})
    run_daemon(cfg, once=True)


def _ncombine(out: Path) -> int:
    return int(fits.getheader(out / "M42" / "L" / "stack.fits")["NCOMBINE"])


def _a_stacked_light(out: Path) -> str:
    return next(r["file"] for r in rows(out) if r["status"] == "stacked" and not r.get("reference"))


def test_a_touched_file_is_skipped_silently(stacked, caplog) -> None:
    capture, out = stacked
    name = _a_stacked_light(out)
    before = rows(out)
    os.utime(capture / name, (1.9e9, 1.9e9))  # a backup tool touched it
    caplog.set_level(logging.DEBUG, logger="subwatch")
    _run(capture, out)
    assert rows(out) == before
    assert _ncombine(out) == 4
    assert any("touched" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_a_renamed_file_is_recorded_as_a_duplicate(stacked) -> None:
    capture, out = stacked
    name = _a_stacked_light(out)
    (capture / name).rename(capture / "renamed_by_user.fits")
    _run(capture, out)
    new = [r for r in rows(out) if r["file"] == "renamed_by_user.fits"]
    assert [(r["status"], r["reason"]) for r in new] == [
        ("duplicate", f"already stacked as {name}")
    ]
    assert _ncombine(out) == 4
    _run(capture, out)  # and it stays done: no second row after another restart
    assert len([r for r in rows(out) if r["file"] == "renamed_by_user.fits"]) == 1


def test_a_copy_under_another_name_is_a_duplicate_too(stacked) -> None:
    capture, out = stacked
    name = _a_stacked_light(out)
    shutil.copy2(capture / name, capture / "copy_of_sub.fits")
    _run(capture, out)
    (row,) = [r for r in rows(out) if r["file"] == "copy_of_sub.fits"]
    assert row["status"] == "duplicate"
    assert _ncombine(out) == 4


def test_changed_content_is_reported_not_restacked(stacked, caplog) -> None:
    capture, out = stacked
    name = _a_stacked_light(out)
    with fits.open(capture / name, mode="update") as hdul:
        hdul[0].header["PLTSOLVD"] = True  # a plate solver rewrote the header
    caplog.set_level(logging.INFO, logger="subwatch")
    _run(capture, out)
    mine = [r for r in rows(out) if r["file"] == name]
    assert [(r["status"], r["reason"]) for r in mine] == [
        ("stacked", None),
        ("error", "changed after stacking"),
    ]
    assert _ncombine(out) == 4
    assert any(
        r.levelno == logging.WARNING and name in r.getMessage() and "changed" in r.getMessage()
        for r in caplog.records
    )
    _run(capture, out)  # reported once, not at every restart
    assert len([r for r in rows(out) if r["file"] == name]) == 2


def test_a_checkpoint_without_fingerprints_still_loads(stacked, caplog) -> None:
    capture, out = stacked
    index = out / ".checkpoint" / "checkpoint.json"
    doc = json.loads(index.read_text())
    assert all(len(entry) == 4 for entry in doc["processed"].values())
    doc["version"] = 1  # as the previous release wrote it: [size, mtime, status]
    doc["processed"] = {k: v[:3] for k, v in doc["processed"].items()}
    index.write_text(json.dumps(doc))
    before = rows(out)
    caplog.set_level(logging.INFO, logger="subwatch")
    _run(capture, out)
    assert "checkpoint unreadable" not in caplog.text
    assert "resumed from checkpoint" in caplog.text
    assert rows(out) == before and _ncombine(out) == 4
    # Resumed entries gain nothing by magic; new files are handled as usual.
    new = capture / "lights" / "M42" / "L" / "late.fits"
    with fits.open(next(capture.rglob("M42_L_*_0004.fits"))) as hdul:
        hdul[0].header["DATE-OBS"] = "2030-01-01T00:00:00"
        hdul.writeto(new)
    _run(capture, out)
    assert [r["file"] for r in rows(out)][len(before) :] == ["lights/M42/L/late.fits"]


def test_fingerprints_tell_content_not_names(tmp_path: Path, night: Path) -> None:
    lights = sorted(night.rglob("M42_L_*.fits"))
    copy = tmp_path / "copy.fits"
    shutil.copy(lights[0], copy)
    os.utime(copy, (1.0e9, 1.0e9))
    assert fingerprint(copy) == fingerprint(lights[0])
    assert len({fingerprint(p) for p in lights}) == len(lights)
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF  # the last pixels changed
    copy.write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(lights[0])


def test_ledger_verdicts() -> None:
    entries = {
        "a.fits": [10, 1.0, "stacked", "fa"],
        "b.fits": [10, 1.0, "rejected", "fb"],
        "c.fits": [10, 1.0, "error", "fc"],
        "old.fits": [10, 1.0, "stacked"],  # from a checkpoint without fingerprints
    }
    ledger = Ledger(entries)
    verdicts = {
        ("a.fits", "fa"): ("skip", None),
        ("a.fits", "f2"): ("changed", "changed after stacking"),
        ("b.fits", "fb"): ("skip", None),
        ("b.fits", "f3"): ("process", None),  # a new version of a rejected sub is judged again
        ("c.fits", "fc"): ("process", None),  # an error is not an outcome: try again
        ("new.fits", "fa"): ("duplicate", "already stacked as a.fits"),
        ("new.fits", "fb"): ("duplicate", "same content as b.fits (rejected)"),
        ("new.fits", "fn"): ("process", None),
        ("old.fits", "fo"): ("changed", "changed after stacking"),
    }
    for (rel, fp), (action, reason) in verdicts.items():
        verdict = ledger.judge(rel, fp)
        assert (verdict.action, verdict.reason) == (action, reason), (rel, fp)
