"""The whole chain on real frames from real cameras (skipped without ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.daemon import run_daemon

pytestmark = pytest.mark.realdata


def _run(watch: Path, out: Path) -> list[dict]:
    cfg = Config.model_validate({"watch": {"path": str(watch)}, "output": {"path": str(out)}})
    run_daemon(cfg, once=True)
    return [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]


def test_alt_az_mono_night_stacks_in_capture_order(real_data: Path, tmp_path: Path) -> None:
    rows = _run(real_data / "jocular-arp186", tmp_path)
    assert [r["file"] for r in rows] == [f"L_{i}.fit" for i in range(1, 25)]
    stacked = [r for r in rows if r["status"] == "stacked"]
    assert len(stacked) >= 20
    assert all(r["inliers"] >= 12 for r in stacked)  # bright stars only (SNR >= 20) are matched
    # an alt-az mount drifts several px per frame: the transforms must show it
    shifts = [np.hypot(r["transform"][0][2], r["transform"][1][2]) for r in stacked]
    assert max(shifts) > 10
    with fits.open(tmp_path / "unknown" / "L" / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == len(stacked)
        assert hdul[0].header["EXPTIME"] == pytest.approx(20.0 * len(stacked))


def test_colour_night_stacks_as_rgb(real_data: Path, tmp_path: Path) -> None:
    rows = _run(real_data / "als-m27-osc", tmp_path)
    assert all(r["status"] == "stacked" for r in rows), [(r["file"], r["reason"]) for r in rows]
    assert all(r.get("registration_rms_bright", 0.0) < 0.5 for r in rows)
    with fits.open(tmp_path / "unknown" / "Luminance" / "stack.fits") as hdul:
        data = hdul[0].data
    assert data.shape == (3, 976, 1304)
    assert np.isfinite(data).all()
