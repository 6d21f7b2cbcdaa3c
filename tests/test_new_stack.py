"""A pointing jump that matches no stack starts a new stack; nothing is forced into the old one."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session

POINTING_KEYS = ("RA", "DEC", "OBJCTRA", "OBJCTDEC")


def _two_fields(root: Path, keep_pointing: bool) -> tuple[Path, list[str], list[str]]:
    """Four subs of one field, then four of another, all labelled OBJECT = M42."""
    capture = root / "capture"
    first = simulate_session(
        SimOptions(
            out=capture / "a",
            lights=4,
            width=480,
            height=360,
            seed=3,
            calibration=False,
            target="M42",
        )
    )
    second = simulate_session(
        SimOptions(
            out=capture / "b",
            lights=4,
            width=480,
            height=360,
            seed=4,
            calibration=False,
            target="M81",
        )
    )
    start = datetime(2026, 11, 21, 23, 0, 0)
    names_a = [f"a/{x['file']}" for x in first["lights"]]
    names_b = [f"b/{x['file']}" for x in second["lights"]]
    for i, name in enumerate(names_a + names_b):
        path = capture / name
        with fits.open(path, mode="update") as hdul:
            header = hdul[0].header
            header["OBJECT"] = "M42"
            header["DATE-OBS"] = (start + timedelta(minutes=2 * i)).isoformat()
            if not keep_pointing:
                for key in POINTING_KEYS:
                    header.remove(key, ignore_missing=True)
        stamp = (start + timedelta(minutes=2 * i)).timestamp()
        os.utime(path, (stamp, stamp))
    for extra in ("a/truth_sky.fits", "b/truth_sky.fits"):
        (capture / extra).unlink()
    return capture, names_a, names_b


@pytest.mark.parametrize("keep_pointing", [True, False])
def test_a_new_field_gets_its_own_stack(tmp_path: Path, keep_pointing: bool) -> None:
    capture, names_a, names_b = _two_fields(tmp_path, keep_pointing)
    out = tmp_path / "out"
    run_daemon(
        Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}}),
        once=True,
    )
    rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    final = {r["file"]: r for r in rows}  # the last row of a file is its outcome
    assert all(final[n]["status"] == "stacked" and final[n]["target"] == "M42" for n in names_a)
    assert all(final[n]["status"] == "stacked" and final[n]["target"] == "M42-2" for n in names_b)
    with fits.open(out / "M42" / "L" / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 4
    with fits.open(out / "M42-2" / "L" / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 4
        assert hdul[0].header["OBJECT"] == "M42" and hdul[0].header["STACK"] == "M42-2"
    if not keep_pointing:
        # without pointing in the headers the first sub of the new field is only known to be
        # new once the second agrees with it: it was tried again and its last row says so
        first_b = [r for r in rows if r["file"] == names_b[0]]
        assert [r["status"] for r in first_b] == ["rejected", "stacked"]
