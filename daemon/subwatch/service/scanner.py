"""Finding frames that are complete, new and ours to read, in capture order.

The scanner only reports; the pipeline decides. Ready files are handed out in capture order:
the header's DATE-OBS when it has one (a folder copied in at once gives every file the same
mtime), else the mtime, with ties in natural name order (``L_2`` before ``L_10``).

A file is *ready* when it matches the include patterns and none of the ignore patterns, lies
outside our own output folder, has been quiet (size and mtime unchanged, and mtime at least
``settle_seconds`` old), and holds as many bytes as its header promises. A file that stays
short after ``incomplete_timeout_seconds`` of quiet is reported as truncated, once. Each ready
file is handed out once per size and mtime.

Directory walking uses ``os.scandir`` on each pass; this is the periodic full rescan every
watcher needs anyway (events get dropped), and on its own it is what network shares need.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from subwatch.config import WatchConfig
from subwatch.frames import (
    SUPPORTED_SUFFIXES,
    FrameReadError,
    IncompleteFrame,
    capture_time,
    check_complete,
)

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    path: Path
    size: int
    mtime: float
    state: str  # "ready" | "truncated" | "unreadable"
    reason: str | None = None
    taken: float | None = None  # capture time from the header (POSIX s), when it has one

    def order(self) -> tuple[float, list[int | str]]:
        """Capture order: the header's time, else the mtime; ties by natural name order."""
        when = self.taken if self.taken is not None else self.mtime
        return (when, _natural(str(self.path)))


def _natural(text: str) -> list[int | str]:
    """``L_2`` before ``L_10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@dataclass
class _Seen:
    size: int
    mtime: float
    first_quiet: float


class Scanner:
    """Walks the watch folder and reports files that became ready since the last call."""

    def __init__(
        self,
        root: Path,
        cfg: WatchConfig,
        exclude: list[Path] | None = None,
        max_dimension: int = 20000,
    ) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.exclude = [Path(p).resolve() for p in (exclude or [])]
        self.max_dimension = max_dimension
        self._seen: dict[Path, _Seen] = {}
        self._handed: dict[Path, tuple[int, float]] = {}
        self.pending: set[Path] = set()

    def _wanted(self, name: str) -> bool:
        if any(fnmatch.fnmatch(name, pat) for pat in self.cfg.ignore):
            return False
        return any(fnmatch.fnmatch(name.lower(), pat.lower()) for pat in self.cfg.include)

    def _walk(self) -> list[tuple[Path, os.stat_result]]:
        found: list[tuple[Path, os.stat_result]] = []
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                if folder == self.root:
                    log.warning("watch folder unavailable: %s", exc)
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not self.cfg.recursive or entry.name.startswith("."):
                            continue
                        path = Path(entry.path)
                        if path.resolve() in self.exclude:
                            continue
                        stack.append(path)
                    elif entry.is_file() and self._wanted(entry.name):
                        found.append((Path(entry.path), entry.stat()))
                except OSError:
                    continue
        return found

    def poll(self, now: float | None = None, *, final: bool = False) -> list[Candidate]:
        """Files that became ready (or definitively broken) since the last poll, oldest first.

        ``final`` (the last pass of ``--once``) reports a file that is still short as truncated
        at once, since nothing will complete it.
        """
        now = time.time() if now is None else now
        out: list[Candidate] = []
        self.pending = set()
        for path, st in self._walk():
            size, mtime = st.st_size, st.st_mtime
            if self._handed.get(path) == (size, mtime):
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime) != (size, mtime):
                seen = _Seen(size, mtime, now)
                self._seen[path] = seen
            # mtime says how long the file has been quiet, unless the clock that wrote it is
            # ahead of ours (network shares): then only our own observation counts.
            observed = now - seen.first_quiet
            age = now - mtime
            quiet = age if age >= 0 else observed
            if quiet < self.cfg.settle_seconds and not final:
                self.pending.add(path)
                continue
            candidate = self._check(path, size, mtime, observed, final)
            if candidate is None:
                self.pending.add(path)
                continue
            self._handed[path] = (size, mtime)
            out.append(candidate)
        out.sort(key=Candidate.order)
        return out

    def _check(
        self, path: Path, size: int, mtime: float, observed: float, final: bool
    ) -> Candidate | None:
        if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
            return Candidate(path, size, mtime, "unreadable", "unsupported format")
        try:
            check_complete(path, self.max_dimension)
        except IncompleteFrame as exc:
            if final or observed >= self.cfg.incomplete_timeout_seconds:
                return Candidate(path, size, mtime, "truncated", f"truncated ({exc.detail})")
            return None
        except FrameReadError as exc:
            return Candidate(path, size, mtime, "unreadable", exc.reason)
        except OSError:
            return None  # vanished or unreadable for now: try again next pass
        return Candidate(path, size, mtime, "ready", taken=capture_time(path))

    def forget(self, path: Path) -> None:
        self._handed.pop(path, None)

    def mark_handled(self, path: Path, size: int | None, mtime: float | None) -> None:
        """A file handled before a restart: not handed out again unless it changes."""
        if size is not None and mtime is not None:
            self._handed[Path(path)] = (int(size), float(mtime))
