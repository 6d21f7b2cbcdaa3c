"""Kill the daemon at any moment, start it again: nothing lost, nothing counted twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from subwatch.simulate import SimOptions, simulate_session
from watching import rows as _rows  # tests below have their own `rows`

DEFECTS = {2: ["trail"], 5: ["clouds"], 7: ["cosmic_rays"]}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    capture = tmp_path_factory.mktemp("capture")
    simulate_session(
        SimOptions(out=capture, lights=10, width=480, height=360, seed=13, defects=DEFECTS)
    )
    return capture


def _config(folder: Path) -> Path:
    path = folder / "subwatch.yaml"
    path.write_text("stacking:\n  checkpoint_frames: 2\n")
    return path


def _start(capture: Path, out: Path, config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "subwatch",
            "run",
            "--once",
            "--config",
            str(config),
            "--watch",
            str(capture),
            "--output",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(capture: Path, out: Path, config: Path) -> None:
    proc = _start(capture, out, config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def _stack(out: Path) -> tuple[fits.Header, np.ndarray]:
    with fits.open(out / "M42" / "L" / "stack.fits") as hdul:
        return hdul[0].header, hdul[0].data.astype(np.float64)


@pytest.fixture(scope="module")
def baseline(session: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    _finish(session, out, _config(out.parent))
    assert _stack(out)[0]["NCOMBINE"] >= 8  # the comparison below means something
    return out


@pytest.mark.parametrize("kill_after_rows", [4, 17, 21, 24])
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    session: Path, baseline: Path, tmp_path: Path, kill_after_rows: int
) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path)
    proc = _start(session, out, config)
    deadline = time.monotonic() + 120
    while len(_rows(out)) < kill_after_rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _finish(session, out, config)

    base_rows, rows = _rows(baseline), _rows(out)
    assert sorted(r["file"] for r in rows) == sorted(r["file"] for r in base_rows)  # once each
    assert {r["file"]: r["status"] for r in rows} == {r["file"]: r["status"] for r in base_rows}
    base_header, base_data = _stack(baseline)
    header, data = _stack(out)
    assert header["NCOMBINE"] == base_header["NCOMBINE"]
    assert header["EXPTIME"] == base_header["EXPTIME"]
    np.testing.assert_allclose(
        data, base_data, rtol=1e-5, atol=1e-5 * float(np.abs(base_data).max())
    )


def test_a_finished_run_started_again_does_nothing_twice(session: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path)
    _finish(session, out, config)
    first_rows, (first_header, first_data) = _rows(out), _stack(out)
    _finish(session, out, config)
    assert _rows(out) == first_rows
    header, data = _stack(out)
    assert header["NCOMBINE"] == first_header["NCOMBINE"]
    np.testing.assert_array_equal(data, first_data)


def test_a_rewritten_stacked_file_is_reported_not_restacked(session: Path, tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    shutil.copytree(session, capture)
    out = tmp_path / "out"
    config = _config(tmp_path)
    _finish(capture, out, config)
    ncombine = _stack(out)[0]["NCOMBINE"]
    light = next(r for r in _rows(out) if r["status"] == "stacked" and not r.get("reference"))
    path = capture / light["file"]
    path.write_bytes(path.read_bytes())  # same bytes, new mtime: the file was touched
    _finish(capture, out, config)
    rows = [r for r in _rows(out) if r["file"] == light["file"]]
    assert [r["status"] for r in rows] == ["stacked"]  # same content: nothing to say
    with fits.open(path, mode="update") as hdul:  # a plate solver rewrites the header
        hdul[0].header["PLTSOLVD"] = True
    _finish(capture, out, config)
    rows = [r for r in _rows(out) if r["file"] == light["file"]]
    assert [r["status"] for r in rows] == ["stacked", "error"]
    assert rows[1]["reason"] == "changed after stacking"
    assert _stack(out)[0]["NCOMBINE"] == ncombine


def test_a_damaged_checkpoint_is_set_aside_and_the_stack_rebuilt(
    session: Path, baseline: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = _config(tmp_path)
    _finish(session, out, config)
    (out / ".checkpoint" / "checkpoint.json").write_text('{"version": 1, "stacks": ["nope')
    _finish(session, out, config)
    assert any(p.name.startswith(".checkpoint.damaged-") for p in out.iterdir())
    assert _stack(out)[0]["NCOMBINE"] == _stack(baseline)[0]["NCOMBINE"]
    assert len(_rows(out)) == len(_rows(baseline))
