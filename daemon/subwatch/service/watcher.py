"""Noticing changes in the watch folder: inotify on local disks, polling on network shares.

Events in, decisions elsewhere. A ``Watcher`` runs one of watchdog's observers over the watch
folder and reports the path of every file that was closed after writing, created or moved in
(and, when polling, modified); it never opens a file and never decides whether one is complete,
new or wanted: the scanner and the ledger do that with whatever was reported.

Which observer:

- **inotify** on local filesystems: the kernel says when a writer closes a file, so a sub is
  looked at the moment it is finished, at no cost while nothing happens.
- **polling** on network shares (NFS, SMB/CIFS, sshfs and other FUSE mounts): inotify only sees
  writes made by the local kernel, and the capture PC writes from elsewhere. The filesystem of
  the watch folder is read from ``/proc/self/mountinfo`` (``watch.mode: auto``), or the user
  says which (``watch.mode``).
- polling also when inotify refuses (``ENOSPC``: too many watches, ``EMFILE``: too many
  instances; both are per-user kernel limits), with a warning saying which limit to raise.

Neither is trusted alone: events get dropped (a full inotify queue, a watch added too late in a
new subfolder), so the daemon also rescans the folder every ``watch.rescan_seconds``.

The watch folder can disappear (a USB disk unplugged, a share dropped) and come back, possibly
as another filesystem mounted on the same path. ``check()``, called every pass by the feeder,
notices both: a warning once when the folder goes, an info line when it is back, and a fresh
observer (old watches point at the old filesystem) after which the caller rescans.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

try:
    from watchdog.observers.inotify import InotifyObserver
except ImportError:  # not Linux
    InotifyObserver = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

# watchdog warns when a new folder's watch is added twice (once for its creation event, once
# while its parent is walked); the second simply replaces the first.
warnings.filterwarnings("ignore", "Callback with id .* already exists", RuntimeWarning)

# Filesystems whose changes may come from another machine, so inotify would miss them.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "davfs",
        "virtiofs",
        "fuse",  # FUSE without a subtype: could be anything, assume remote
    }
)
# FUSE filesystems on a local block device (ntfs-3g, exfat-fuse): written by the local kernel.
LOCAL_FUSE = frozenset({"fuseblk"})

# The observers, by mode; tests put a failing class here to exercise the fallback.
OBSERVERS: dict[str, Callable[..., BaseObserver] | None] = {
    "inotify": InotifyObserver,
    "polling": PollingObserver,
}

# What each observer is asked for: inotify's close-after-write is the signal that a writer is
# done; polling has no close events, so modifications stand in for it.
_INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
_POLLING_EVENTS = [*_INOTIFY_EVENTS, FileModifiedEvent]
_REPORTED = {EVENT_TYPE_CLOSED, EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_MODIFIED}


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The type of the filesystem holding ``path`` (``ext4``, ``nfs4``, ``fuse.sshfs``...).

    The mount whose mount point is the longest prefix of the resolved path wins; of several
    mounts on the same point, the last (the one on top). None when it cannot be told.
    """
    try:
        target = Path(path).resolve()
        lines = mountinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        point = Path(_unescape(fields[4]))
        if target == point or target.is_relative_to(point):
            depth = len(point.parts)
            if best is None or depth >= best[0]:
                best = (depth, rest[0])
    return best[1] if best else None


def is_network(fstype: str | None) -> bool:
    if fstype is None or fstype in LOCAL_FUSE:
        return False
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def choose_mode(mode: str, root: Path) -> tuple[str, str]:
    """The observer for ``watch.mode`` at ``root``, and why (for the log)."""
    if mode == "polling":
        return "polling", "watch.mode is polling"
    if OBSERVERS.get("inotify") is None:
        return "polling", "inotify is not available on this system"
    if mode == "inotify":
        return "inotify", "watch.mode is inotify"
    fstype = filesystem_type(root)
    if is_network(fstype):
        return "polling", f"{root} is on {fstype}, a network filesystem inotify cannot see into"
    return "inotify", f"{root} is on {fstype or 'a local filesystem'}"


class _Reporter(FileSystemEventHandler):
    """Passes paths on; remembers if the watched folder itself was deleted."""

    def __init__(self, root: str, report: Callable[[Path], None]) -> None:
        self.root = root
        self.report = report
        self.root_deleted = False

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == EVENT_TYPE_DELETED:
            if event.is_directory and os.fsdecode(event.src_path) == self.root:
                self.root_deleted = True
            return
        if event.event_type not in _REPORTED:
            return
        dest = getattr(event, "dest_path", "")
        self.report(Path(os.fsdecode(dest or event.src_path)))


class Watcher:
    """Reports paths under ``root`` that may have changed; keeps an observer alive over it.

    ``report(path)`` is called from watchdog's threads and must not block (the feeder adds the
    path to a set). ``mode`` is ``watch.mode``; ``self.mode`` is the observer actually running.
    """

    def __init__(
        self,
        root: Path,
        report: Callable[[Path], None],
        *,
        mode: str = "auto",
        recursive: bool = True,
        poll_seconds: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.report = report
        self.requested = mode
        self.recursive = recursive
        self.poll_seconds = poll_seconds
        self.mode: str | None = None
        self._observer: BaseObserver | None = None
        self._handler: _Reporter | None = None
        self._identity: tuple[int, int] | None = None
        self._gone = False
        self._inotify_refused = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._current_identity() is None:
            self._went()
        else:
            self._open()

    def stop(self) -> None:
        self._close()

    def check(self) -> bool:
        """Follow the folder going and coming back; True when a fresh observer was started
        (the caller should rescan: events may have been missed meanwhile)."""
        identity = self._current_identity()
        if identity is None:
            if not self._gone:
                self._went()
            return False
        if self._gone:
            log.info("watch folder %s is back; watching it again", self.root)
            self._gone = False
            return self._open()
        if identity != self._identity or not self._alive():
            log.info(
                "watch folder %s was replaced (remounted?) or its observer stopped; "
                "watching it again",
                self.root,
            )
            self._close()
            return self._open()
        return False

    # -- internals ---------------------------------------------------------------------------

    def _current_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def _went(self) -> None:
        log.warning(
            "watch folder %s is not there (disk unplugged or share dropped?); "
            "waiting for it to come back",
            self.root,
        )
        self._gone = True
        self._close()

    def _alive(self) -> bool:
        observer, handler = self._observer, self._handler
        if observer is None or handler is None or handler.root_deleted:
            return False
        return observer.is_alive() and all(e.is_alive() for e in observer.emitters)

    def _open(self) -> bool:
        mode, why = choose_mode(self.requested, self.root)
        if mode == "inotify" and self._inotify_refused:
            mode, why = "polling", "inotify refused earlier"
        try:
            self._start_observer(mode)
        except OSError as exc:
            if mode == "inotify" and exc.errno in (errno.ENOSPC, errno.EMFILE):
                self._inotify_refused = True
                log.warning(
                    "inotify refused to watch %s (%s); polling every %g s instead. Raise "
                    "fs.inotify.max_user_watches / max_user_instances (sysctl) to use inotify",
                    self.root,
                    exc.strerror or exc,
                    self.poll_seconds,
                )
                mode, why = "polling", "inotify limit reached"
                try:
                    self._start_observer(mode)
                except OSError as again:
                    return self._failed(again)
            else:
                return self._failed(exc)
        if mode != self.mode:
            log.info("watching %s with %s (%s)", self.root, mode, why)
        self.mode = mode
        return True

    def _failed(self, exc: OSError) -> bool:
        # The folder went between the check and the watch: the next check sees it gone.
        log.debug("cannot watch %s yet: %s", self.root, exc)
        self._close()
        return False

    def _start_observer(self, mode: str) -> None:
        factory = OBSERVERS[mode]
        assert factory is not None
        kwargs: dict[str, Any] = {"timeout": self.poll_seconds} if mode == "polling" else {}
        observer = factory(**kwargs)
        handler = _Reporter(str(self.root), self.report)
        self._identity = self._current_identity()
        try:
            observer.schedule(
                handler,
                str(self.root),
                recursive=self.recursive,
                event_filter=_POLLING_EVENTS if mode == "polling" else _INOTIFY_EVENTS,
            )
            observer.start()
        except BaseException:
            _halt(observer)
            raise
        self._observer, self._handler = observer, handler

    def _close(self) -> None:
        observer, self._observer, self._handler = self._observer, None, None
        if observer is not None:
            _halt(observer)


def _halt(observer: BaseObserver) -> None:
    """Stop an observer, whatever state its threads are in."""
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except (OSError, RuntimeError) as exc:
        log.debug("stopping the observer: %s", exc)
