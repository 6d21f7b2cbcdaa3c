"""The command line: help, version, config checking and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from subwatch import __version__
from subwatch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "subwatch", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize("command", ["run", "demo", "simulate", "check-config"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: subwatch" in capsys.readouterr().out


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "demo", "simulate", "check-config"):
        assert command in out


def test_check_config_accepts_the_shipped_file() -> None:
    proc = _run("check-config", str(ROOT / "config" / "subwatch.yaml"))
    assert proc.returncode == 0, proc.stderr


def test_check_config_names_the_typo(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("watch:\n  pathh: /data\nstacking:\n  kappa: -2\n")
    proc = _run("check-config", str(bad))
    assert proc.returncode != 0
    assert "watch.pathh" in proc.stderr and "did you mean 'path'" in proc.stderr
    assert "stacking.kappa" in proc.stderr and "-2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_without_a_watch_folder_says_so() -> None:
    proc = _run("run", "--once")
    assert proc.returncode == 2
    assert "--watch" in proc.stderr


def test_run_with_a_missing_folder_fails_cleanly(tmp_path: Path) -> None:
    proc = _run("run", "--once", "--watch", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_http_flag_is_a_config_error(tmp_path: Path) -> None:
    proc = _run("run", "--once", "--watch", str(tmp_path), "--http", "localhost")
    assert proc.returncode == 3
    assert "--http" in proc.stderr


def test_simulate_writes_truth(tmp_path: Path) -> None:
    proc = _run(
        "simulate",
        "--out",
        str(tmp_path / "s"),
        "--lights",
        "2",
        "--width",
        "256",
        "--height",
        "192",
        "--no-calibration",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "truth.json").is_file()
