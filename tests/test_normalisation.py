"""Subs dimmed by haze are brought to the reference's brightness before they are stacked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from subwatch.config import Config
from subwatch.measure import measure_frame
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session
from subwatch.stack.photometry import flux_scale, reference_photometry

HAZE = {2: ["haze"], 5: ["haze"], 6: ["haze"]}


def _stack_of(out: Path, rows: list[dict]) -> np.ndarray:
    row = next(r for r in rows if r.get("reference"))
    return fits.getdata(out / row["target"] / row["filter"] / "stack.fits").astype(np.float32)


def _brightness(stack: np.ndarray, reference: np.ndarray) -> float:
    """Star fluxes of ``stack`` over those of ``reference`` (same grid), one aperture each."""
    m = measure_frame(reference)
    ref = reference_photometry(reference, m.stars, m.fwhm)
    assert ref is not None
    return 1.0 / flux_scale(stack, np.ones(stack.shape, bool), ref, measure_frame(stack).fwhm).scale


@pytest.fixture(scope="module")
def hazy_night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, np.ndarray]:
    """The night, and the calibrated reference sub alone (a stack of one) to compare with."""
    root = tmp_path_factory.mktemp("hazy")
    capture = root / "capture"
    truth = simulate_session(
        SimOptions(out=capture, lights=8, width=640, height=480, seed=12, defects=HAZE)
    )
    alone = root / "alone"
    shutil.copytree(capture / "calibration", alone / "calibration")
    first = truth["lights"][0]["file"]
    (alone / first).parent.mkdir(parents=True)
    shutil.copy2(capture / first, alone / first)
    rows = _run(alone, root / "alone-out")
    return capture, truth, _stack_of(root / "alone-out", rows)


def _run(capture: Path, out: Path, **stacking: object) -> list[dict]:
    cfg = Config.model_validate(
        {"watch": {"path": str(capture)}, "output": {"path": str(out)}, "stacking": stacking}
    )
    run_daemon(cfg, once=True)
    rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "light"]


def test_flux_scale_matches_the_true_transparency(hazy_night, tmp_path: Path) -> None:
    capture, truth, _ = hazy_night
    rows = {r["file"]: r for r in _run(capture, tmp_path / "out")}
    assert all(r["status"] == "stacked" for r in rows.values()), "haze is no reason to reject"
    ref = truth["lights"][0]
    for light in truth["lights"][1:]:
        row = rows[light["file"]]
        expected = ref["transparency"] / light["transparency"]
        assert row["flux_scale_stars"] >= 20
        assert row["flux_scale"] == pytest.approx(expected, rel=0.01), light["file"]
    hazy = [rows[truth["lights"][i]["file"]]["flux_scale"] for i in HAZE]
    assert min(hazy) > 1.2  # the haze was really there, and measured


def test_hazy_subs_do_not_dim_the_stack(hazy_night, tmp_path: Path) -> None:
    capture, _, reference = hazy_night
    rows = _run(capture, tmp_path / "scaled")
    assert _brightness(_stack_of(tmp_path / "scaled", rows), reference) == pytest.approx(
        1.0, abs=0.01
    )
    # Without the scale, three hazy subs of eight pull the stars down by several percent
    # (rejection, left off here, hides part of that by clipping the dim star cores).
    rows = _run(capture, tmp_path / "plain", normalize=False, rejection="none")
    assert _brightness(_stack_of(tmp_path / "plain", rows), reference) < 0.95
