"""Finding frames that are complete, new and ours to read, in capture order.

The scanner only reports; the pipeline decides. Ready files are handed out in capture order:
the header's DATE-OBS when it has one (a folder copied in at once gives every file the same
mtime), else the mtime, with ties in natural name order (``L_2`` before ``L_10``).

A file is *ready* when it matches the include patterns and none of the ignore patterns, lies
outside our own output folder, has been quiet (size and mtime unchanged, and mtime at least
``settle_seconds`` old), and holds as many bytes as its header promises; its fingerprint (see
``ledger``) is taken then. A file that is quiet but still short is reported once as *waiting*
(so a stuck file shows in the journal), and as *incomplete* once it has stayed short for
``incomplete_timeout_seconds``. Each ready file is handed out once per size and mtime.

``poll()`` walks the whole folder (the start-up scan, and the periodic rescan every watcher
needs because events get dropped); ``poll(paths=...)`` looks only at the paths an observer
reported and at the files still pending, which is what keeps a folder of thousands of subs cheap
to watch. A directory among ``paths`` (a night's folder moved in) is walked.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
from collections.abc import Iterable
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
from subwatch.service.ledger import fingerprint

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    path: Path
    size: int
    mtime: float
    state: str  # "ready" | "waiting" | "incomplete" | "unreadable"
    reason: str | None = None
    taken: float | None = None  # capture time from the header (POSIX s), when it has one
    fingerprint: str | None = None  # content identity of a ready file (see ledger)

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
    """Looks at the watch folder and reports files that became ready since the last call."""

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
        self._waiting: set[Path] = set()  # reported as waiting, not handed out yet
        self._ready: dict[Path, Candidate] = {}  # completeness and identity, per size and mtime
        self.pending: set[Path] = set()

    def _wanted(self, name: str) -> bool:
        if any(fnmatch.fnmatch(name, pat) for pat in self.cfg.ignore):
            return False
        return any(fnmatch.fnmatch(name.lower(), pat.lower()) for pat in self.cfg.include)

    def _skipped_dir(self, path: Path) -> bool:
        return path.name.startswith(".") or path.resolve() in self.exclude

    def _walk(self, top: Path) -> list[tuple[Path, os.stat_result]]:
        found: list[tuple[Path, os.stat_result]] = []
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                # The watcher says when the watch folder itself goes and comes back.
                log.debug("cannot list %s: %s", folder, exc)
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        path = Path(entry.path)
                        if self.cfg.recursive and not self._skipped_dir(path):
                            stack.append(path)
                    elif entry.is_file() and self._wanted(entry.name):
                        found.append((Path(entry.path), entry.stat()))
                except OSError:
                    continue
        return found

    def _look_at(self, paths: Iterable[Path]) -> list[tuple[Path, os.stat_result]]:
        """The reported paths (files, or folders to walk) that exist and are ours, each once.

        A folder and a file in it are often reported together (a night's folder created, its
        first sub written): the file must be considered once, or a pass could both hand it
        out and report it as still being written.
        """
        found: dict[Path, os.stat_result] = {}
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                self._drop(path)  # gone (renamed away, deleted): nothing to wait for
                continue
            if not path.is_relative_to(self.root) or path == self.root:
                continue
            parents = path.relative_to(self.root).parents
            folders = [self.root / p for p in parents if str(p) != "."]
            if any(self._skipped_dir(f) for f in folders) or (folders and not self.cfg.recursive):
                continue
            if os.path.isdir(path):
                if self.cfg.recursive and not self._skipped_dir(path):
                    found.update(self._walk(path))
            elif self._wanted(path.name):
                found[path] = st
        return list(found.items())

    def _drop(self, path: Path) -> None:
        self._seen.pop(path, None)
        self._ready.pop(path, None)
        self._waiting.discard(path)
        self.pending.discard(path)

    def poll(
        self,
        now: float | None = None,
        *,
        final: bool = False,
        paths: Iterable[Path] | None = None,
    ) -> list[Candidate]:
        """Files that became ready (or need a row) since the last poll, oldest first.

        ``paths``: look only at these (and at the files still pending) instead of walking the
        whole folder. ``final`` (the last pass of ``--once``) reports a file that is still
        short as incomplete at once, since nothing will complete it.
        """
        now = time.time() if now is None else now
        if paths is None:
            found = self._walk(self.root)
            present = {p for p, _ in found}
            for gone in [p for p in self._seen if p not in present]:
                self._drop(gone)
        else:
            found = self._look_at({*map(Path, paths), *self.pending})
        out: list[Candidate] = []
        self.pending = set()
        for path, st in found:
            candidate = self._consider(path, st.st_size, st.st_mtime, now, final)
            if candidate is None:
                continue
            if candidate.state == "waiting":
                self._waiting.add(path)
                self.pending.add(path)
            else:
                self._handed[path] = (candidate.size, candidate.mtime)
                self._waiting.discard(path)
                self._ready.pop(path, None)
                self._seen.pop(path, None)
            out.append(candidate)
        out.sort(key=Candidate.order)
        return out

    def _consider(
        self, path: Path, size: int, mtime: float, now: float, final: bool
    ) -> Candidate | None:
        if self._handed.get(path) == (size, mtime):
            return None
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
            return None
        candidate = self._check(path, size, mtime, observed, final)
        if candidate is None or (candidate.state == "waiting" and path in self._waiting):
            self.pending.add(path)
            return None
        return candidate

    def _check(
        self, path: Path, size: int, mtime: float, observed: float, final: bool
    ) -> Candidate | None:
        known = self._ready.get(path)
        if known is not None and (known.size, known.mtime) == (size, mtime):
            return known
        if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
            return Candidate(path, size, mtime, "unreadable", "unsupported format")
        try:
            check_complete(path, self.max_dimension)
            ready = Candidate(
                path, size, mtime, "ready", taken=capture_time(path), fingerprint=fingerprint(path)
            )
            if _changed(path, size, mtime):
                # Written to between our stat and our reads: the size and mtime we hold are
                # not the complete file's, and its row and identity must be. Look again.
                return None
        except IncompleteFrame as exc:
            if final or observed >= self.cfg.incomplete_timeout_seconds:
                return Candidate(path, size, mtime, "incomplete", f"truncated ({exc.detail})")
            return Candidate(path, size, mtime, "waiting", f"waiting for data ({exc.detail})")
        except FrameReadError as exc:
            return Candidate(path, size, mtime, "unreadable", exc.reason)
        except PermissionError:  # said once, in the journal, rather than waited on forever
            return Candidate(path, size, mtime, "unreadable", "permission denied")
        except OSError:
            return None  # vanished or unreadable for now: try again next pass
        self._ready[path] = ready
        return ready

    def defer(self, candidate: Candidate) -> None:
        """Hand ``candidate`` out again at the next look: it could not be queued this time.

        What was learnt about it (complete, capture time, fingerprint) is kept while its size
        and mtime stay the same, so a deferred backlog costs a ``stat`` per file and pass.
        """
        self._handed.pop(candidate.path, None)
        self._waiting.discard(candidate.path)
        self.pending.add(candidate.path)
        if candidate.state == "ready":
            self._ready[candidate.path] = candidate

    def mark_waiting(self, path: Path) -> None:
        """A file reported as waiting before a restart: followed, not reported again."""
        self._waiting.add(Path(path))

    def mark_handled(self, path: Path, size: int | None, mtime: float | None) -> None:
        """A file handled before a restart: not handed out again unless it changes."""
        if size is not None and mtime is not None:
            self._handed[Path(path)] = (int(size), float(mtime))


def _changed(path: Path, size: int, mtime: float) -> bool:
    """Whether the file's size or mtime is no longer what was seen (or it is gone)."""
    try:
        st = path.stat()
    except OSError:
        return True
    return (st.st_size, st.st_mtime) != (size, mtime)
