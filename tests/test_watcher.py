"""Watching a folder: events, complete files only, ignored names, polling, a folder that goes
away and comes back, inotify refusing, and the rescan that catches what events miss."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from subwatch.service import pipeline as pipeline_module
from subwatch.service import watcher as watcher_module
from subwatch.service.daemon import run_daemon
from subwatch.service.watcher import filesystem_type, is_network
from subwatch.simulate.fitswrite import write_chunked
from watching import Running, bias_bytes, rows, wait_until, watch_config


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    watch = tmp_path / "watch"
    watch.mkdir()
    return watch, tmp_path / "out"


def _reads_checked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Record, for every file the pipeline reads, its size then and its final size."""
    seen: list[tuple[str, int, int]] = []
    real = pipeline_module.read_frame

    def read_frame(path: Path, **kw: Any) -> Any:
        size = Path(path).stat().st_size
        frame = real(path, **kw)
        seen.append((Path(path).name, size, Path(path).stat().st_size))
        return frame

    monkeypatch.setattr(pipeline_module, "read_frame", read_frame)
    return seen


def test_inotify_events_take_complete_files(folders, monkeypatch) -> None:
    watch, out = folders
    reads = _reads_checked(monkeypatch)
    with Running(watch_config(watch, out, mode="inotify")) as running:
        assert running.daemon.feeder.watcher.mode == "inotify"
        (watch / "bias_1.fits").write_bytes(bias_bytes(1))
        row = running.wait_for_file("bias_1.fits")
    assert row["status"] == "calibration"
    assert reads == [("bias_1.fits", len(bias_bytes(1)), len(bias_bytes(1)))]


def test_a_slowly_written_file_is_never_read_early(folders, monkeypatch) -> None:
    """Pauses longer than the settle time: the header's promised size is what holds it back."""
    watch, out = folders
    reads = _reads_checked(monkeypatch)
    payload = bias_bytes(2, size=96)
    with Running(watch_config(watch, out, mode="inotify")) as running:
        write_chunked(watch / "slow.fits", payload, chunks=3, pause=0.6)
        row = running.wait_for_file("slow.fits", "calibration")
        statuses = [r["status"] for r in running.rows() if r["file"] == "slow.fits"]
    assert row["size"] == len(payload)
    assert reads == [("slow.fits", len(payload), len(payload))]
    # Quiet but short for longer than the settle time: one "waiting" row, not one per poll.
    assert statuses == ["waiting", "calibration"]


def test_hidden_and_temporary_names_are_ignored(folders) -> None:
    watch, out = folders
    ignored = [".hidden.fits", "~lock.fits", "copy.fits.tmp", "upload.fits.part"]
    with Running(watch_config(watch, out)) as running:
        for i, name in enumerate(ignored):
            (watch / name).write_bytes(bias_bytes(10 + i))
        (watch / "real.fits").write_bytes(bias_bytes(20))
        running.wait_for_file("real.fits")
    # A full scan of the same folder (a restart with --once) finds nothing more to do either.
    run_daemon(watch_config(watch, out), once=True)
    assert [r["file"] for r in rows(out)] == ["real.fits"]


def test_polling_mode_finds_files_without_inotify(folders) -> None:
    watch, out = folders
    with Running(watch_config(watch, out, mode="polling")) as running:
        assert running.daemon.feeder.watcher.mode == "polling"
        (watch / "night").mkdir()
        (watch / "night" / "bias_3.fits").write_bytes(bias_bytes(3))
        assert running.wait_for_file("night/bias_3.fits")["status"] == "calibration"


def test_the_watch_folder_going_and_coming_back_is_survived(folders, caplog) -> None:
    watch, out = folders
    caplog.set_level(logging.INFO, logger="subwatch")
    with Running(watch_config(watch, out, mode="inotify")) as running:
        (watch / "before.fits").write_bytes(bias_bytes(4))
        running.wait_for_file("before.fits")
        shutil.rmtree(watch)  # the USB disk is unplugged
        wait_until(lambda: "is not there" in caplog.text, "the warning that the folder went")
        watch.mkdir()  # and plugged back in
        wait_until(lambda: "is back" in caplog.text, "the note that the folder is back")
        (watch / "after.fits").write_bytes(bias_bytes(5))
        assert running.wait_for_file("after.fits")["status"] == "calibration"
    gone = [r for r in caplog.records if "is not there" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING


class _RefusingInotify(watcher_module.PollingObserver):
    """An observer that fails to start the way inotify does at its watch limit."""

    def start(self) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_inotify_limits_fall_back_to_polling(folders, monkeypatch, caplog) -> None:
    watch, out = folders
    monkeypatch.setitem(watcher_module.OBSERVERS, "inotify", _RefusingInotify)
    caplog.set_level(logging.INFO, logger="subwatch")
    with Running(watch_config(watch, out, mode="inotify")) as running:
        assert running.daemon.feeder.watcher.mode == "polling"
        (watch / "bias_6.fits").write_bytes(bias_bytes(6))
        assert running.wait_for_file("bias_6.fits")["status"] == "calibration"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("inotify watch limit reached" in r.getMessage() for r in warnings)
    assert any("max_user_watches" in r.getMessage() for r in warnings)


def test_the_rescan_catches_a_file_whose_event_was_dropped(folders, monkeypatch) -> None:
    watch, out = folders
    # Every event is lost, as when the kernel's inotify queue overflows.
    monkeypatch.setattr(watcher_module._Reporter, "on_any_event", lambda self, event: None)
    cfg = watch_config(watch, out, mode="inotify", rescan_seconds=0.5)
    with Running(cfg) as running:
        (watch / "unseen.fits").write_bytes(bias_bytes(7))
        assert running.wait_for_file("unseen.fits")["status"] == "calibration"


def test_filesystem_type_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n"
        "40 22 0:45 / /mnt/nas rw,relatime shared:30 - nfs4 nas:/astro rw,vers=4.2\n"
        "41 22 0:46 / /mnt/my\\040disk rw - fuseblk /dev/sdb1 rw\n"
        "42 22 0:47 / /home/u/remote rw - fuse.sshfs u@pi:/data rw\n"
        "43 40 0:48 / /mnt/nas/local rw - tmpfs tmpfs rw\n"
    )
    types = {
        p: filesystem_type(Path(p), mountinfo)
        for p in ("/data", "/mnt/nas/2024", "/mnt/my disk/x", "/home/u/remote/a", "/mnt/nas/local")
    }
    assert types == {
        "/data": "ext4",
        "/mnt/nas/2024": "nfs4",
        "/mnt/my disk/x": "fuseblk",
        "/home/u/remote/a": "fuse.sshfs",
        "/mnt/nas/local": "tmpfs",
    }
    network = {p for p, t in types.items() if is_network(t)}
    assert network == {"/mnt/nas/2024", "/home/u/remote/a"}


def test_auto_mode_polls_a_network_share(folders, monkeypatch) -> None:
    watch, out = folders
    monkeypatch.setattr(watcher_module, "filesystem_type", lambda path: "cifs")
    with Running(watch_config(watch, out, mode="auto")) as running:
        assert running.daemon.feeder.watcher.mode == "polling"
    monkeypatch.setattr(watcher_module, "filesystem_type", lambda path: "ext4")
    with Running(watch_config(watch, out, mode="auto")) as running:
        assert running.daemon.feeder.watcher.mode == "inotify"


def test_the_capture_folder_is_never_written(folders) -> None:
    watch, out = folders
    (watch / "a.fits").write_bytes(bias_bytes(8))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watch.rglob("*")}
    with Running(watch_config(watch, out)) as running:
        running.wait_for_file("a.fits")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watch.rglob("*")} == before
    assert os.listdir(watch) == ["a.fits"]


def test_a_file_still_waiting_at_a_restart_is_followed_after_it(folders) -> None:
    watch, out = folders
    (watch / "stuck.fits").write_bytes(bias_bytes(9, size=64)[:3000])  # the writer hung
    with Running(watch_config(watch, out)) as running:
        running.wait_for_file("stuck.fits", "waiting")
    with Running(watch_config(watch, out, incomplete_timeout_seconds=0.5)) as running:
        row = running.wait_for_file("stuck.fits", "incomplete")
    assert row["reason"].startswith("truncated")
    assert [r["status"] for r in rows(out)] == ["waiting", "incomplete"]
