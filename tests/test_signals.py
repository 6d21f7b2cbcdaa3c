"""Signals: SIGTERM finishes the frame, checkpoints and exits 0; SIGHUP reloads the config,
applying what can change live and keeping the running config when the new one is bad."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from astropy.io import fits

from subwatch.config import apply_overrides, load_config
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session
from watching import Running, bias_bytes, json_lines, rows, wait_until, watch_config

STOP_WITHIN = 10.0  # seconds: what a service manager allows before it kills


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    capture = tmp_path_factory.mktemp("capture")
    simulate_session(SimOptions(out=capture, lights=6, width=256, height=256, seed=17))
    broken = capture / "lights" / "broken.fits"
    broken.write_text("not an image\n" * 300)  # an expected failure: one log line, no traceback
    os.utime(broken, (1.0e9, 1.0e9))  # the oldest file: taken first
    return capture


def _daemon(
    config: Path, watch: Path, out: Path, log: Path, *extra: str, env: dict | None = None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "subwatch", "run", "--config", str(config)]
    command += ["--watch", str(watch), "--output", str(out), *extra]
    with open(log, "ab") as err:
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})}
        )


def _messages(log: Path) -> list[dict]:
    """The JSON log lines so far (every complete line must be one)."""
    return json_lines(log)


def _logged(log: Path, *words: str) -> list[dict]:
    return [m for m in _messages(log) if all(w in m["message"] for w in words)]


def _fits_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.fits")}


def test_sigterm_finishes_checkpoints_and_exits_0_then_resumes(night: Path, tmp_path) -> None:
    out, log = tmp_path / "out", tmp_path / "daemon.log"
    config = tmp_path / "subwatch.yaml"
    config.write_text(
        "watch:\n  settle_seconds: 0.2\n  poll_seconds: 0.1\n"
        "stacking:\n  checkpoint_frames: 2\nhttp:\n  enabled: false\n"
        "logging:\n  format: json\n"
    )
    proc = _daemon(config, night, out, log)
    try:
        wait_until(
            lambda: sum(r["kind"] == "light" for r in rows(out)) >= 2 or proc.poll() is not None,
            "two lights done",
            timeout=120,
        )
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_WITHIN) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / ".checkpoint" / "checkpoint.json").exists()
    assert _logged(log, "SIGTERM")
    done_before = len(rows(out))
    assert done_before < len(_fits_files(night))  # it really stopped mid-run

    # The restart, in this process (an interpreter start saved): it carries on from there.
    cfg = apply_overrides(load_config(config), watch=night, output=out)
    run_daemon(cfg, once=True)
    final = rows(out)
    files = [r["file"] for r in final]
    assert sorted(files) == sorted(_fits_files(night))  # every file once: none lost, none twice
    stacked = [r for r in final if r["status"] == "stacked"]
    header = fits.getheader(out / "M42" / "L" / "stack.fits")
    assert header["NCOMBINE"] == len(stacked) >= 5
    (bad,) = _logged(log, "broken.fits")
    assert bad["level"] == "WARNING" and "not a FITS file" in bad["message"]
    assert all("exception" not in m and "Traceback" not in m["message"] for m in _messages(log))


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    folder = tempfile.mkdtemp(prefix="sw")  # short: socket paths are limited to 108 bytes
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


class _Manager:
    """What a service manager hears on its notify socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.heard: list[str] = []

    def wait(self, text: str) -> None:
        end = time.monotonic() + 60
        while not any(text in m for m in self.heard):
            assert time.monotonic() < end, f"no {text!r} in {self.heard}"
            try:
                self.heard.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(tmp_path, notify_socket) -> None:
    watch, out, log = tmp_path / "watch", tmp_path / "out", tmp_path / "daemon.log"
    watch.mkdir()
    config = tmp_path / "subwatch.yaml"
    base = (
        "watch:\n  settle_seconds: 0.2\n  poll_seconds: 0.1\nhttp:\n  enabled: false\n"
        "logging:\n  format: json\n"
    )
    # Without --output the file's output.path applies, so changing it is a change to report.
    config.write_text(base + f"output:\n  path: {out}\n")
    address, sock = notify_socket
    manager = _Manager(sock)
    command = [sys.executable, "-m", "subwatch", "run", "--config", str(config)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*command, "--watch", str(watch)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
        )
    try:
        manager.wait("READY=1")
        manager.wait("WATCHDOG=1")  # pinged by the worker while idle

        config.write_text(
            base + f"output:\n  path: {tmp_path / 'elsewhere'}\ngates:\n  max_fwhm_ratio: 1.8\n"
        )
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: bool(_logged(log, "config reloaded")), "the reload")
        (applied,) = _logged(log, "config reloaded")
        assert "gates.max_fwhm_ratio: 1.5 -> 1.8" in applied["message"]
        (held,) = _logged(log, "output.path", "needs a restart")
        assert held["level"] == "WARNING"
        manager.wait("RELOADING=1")

        config.write_text("gates:\n  max_fwhm_ratio: [not a number\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: bool(_logged(log, "config reload failed")), "the failed reload")
        (failed,) = _logged(log, "config reload failed")
        assert failed["level"] == "ERROR" and "keeping the running config" in failed["message"]

        (watch / "bias.fits").write_bytes(bias_bytes(1))  # still working, into the old output
        wait_until(lambda: any(r["file"] == "bias.fits" for r in rows(out)), "a frame after")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_WITHIN) == 0
        manager.wait("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
    reloading = next(i for i, m in enumerate(manager.heard) if "RELOADING=1" in m)
    assert any("READY=1" in m for m in manager.heard[reloading:])  # the reload was completed
    assert any("STATUS=1 frame done" in m for m in manager.heard)
    assert not (tmp_path / "elsewhere").exists()


def test_live_keys_apply_and_restart_keys_wait(tmp_path: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    config = tmp_path / "subwatch.yaml"
    config.write_text(
        f"gates:\n  max_fwhm_ratio: 2.5\nwatch:\n  path: {watch}\n  settle_seconds: 0.5\n"
        f"  mode: polling\noutput:\n  path: {tmp_path / 'other'}\n"
    )
    cfg = watch_config(watch, out)
    with Running(cfg, reload_config=lambda: load_config(config)) as running:
        running.daemon.request_reload()
        wait_until(lambda: running.daemon.pipeline.cfg.gates.max_fwhm_ratio == 2.5, "the new gate")
        live = running.daemon.pipeline.cfg
        assert live.watch.settle_seconds == 0.5
        assert running.daemon.feeder.scanner.cfg.settle_seconds == 0.5
        assert live.watch.mode == cfg.watch.mode and live.output.path == out  # need a restart
        (watch / "a.fits").write_bytes(bias_bytes(2))
        running.wait_for_file("a.fits")


def test_reconcile_splits_live_changes_from_restart_ones() -> None:
    from subwatch.config import Config
    from subwatch.service.reload import reconcile

    running = Config.model_validate({"output": {"path": "/a"}, "logging": {"level": "INFO"}})
    loaded = Config.model_validate(
        {
            "output": {"path": "/b"},
            "logging": {"level": "DEBUG", "format": "json"},
            "http": {"listen": "127.0.0.1:9000"},
            "stacking": {"checkpoint_frames": 9},
        }
    )
    result = reconcile(running, loaded)
    assert [c.key for c in result.applied] == [
        "logging.format",
        "logging.level",
        "stacking.checkpoint_frames",
    ]
    assert [c.key for c in result.need_restart] == ["http.listen", "output.path"]
    assert result.config.logging.level == "DEBUG" and result.config.stacking.checkpoint_frames == 9
    assert str(result.config.output.path) == "/a" and result.config.http.listen == "127.0.0.1:8750"
