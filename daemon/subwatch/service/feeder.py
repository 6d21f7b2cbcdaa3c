"""From the watch folder to the worker: a thread that turns reports into a bounded queue.

The watcher's observer threads only add paths to a set (``report``) and wake this thread; they
never wait for anything, so a burst of events cannot stall them. This thread asks the scanner
about the reported paths (and about files still settling), does a full rescan at start-up and
every ``watch.rescan_seconds``, sorts what became ready by capture time and puts it on the
worker's queue.

The queue is bounded (``QUEUE_SIZE``): a night copied in at once must not become 300 entries
of work committed in whatever order the events came. When the queue is full, what did not fit
is handed back to the scanner (``Scanner.defer``) and offered again at the next pass, sorted
together with anything new; the worker wakes this thread when it has room. Memory stays flat
(the scanner keeps a few numbers per file, nothing per byte) and order is capture order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from subwatch.service.scanner import Candidate, Scanner
from subwatch.service.watcher import Watcher

log = logging.getLogger(__name__)

QUEUE_SIZE = 16  # files handed to the worker ahead of time; the rest wait in the folder
BURST_QUIET = 0.1  # seconds without events before a burst of reports is looked at


class WorkQueue(queue.Queue[Candidate]):
    """A bounded queue that remembers the most it ever held (tests and metrics read it)."""

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        super().__init__(maxsize)
        self.high_water = 0

    def _put(self, item: Candidate) -> None:
        super()._put(item)
        self.high_water = max(self.high_water, self._qsize())


class Feeder(threading.Thread):
    """Scans on reports, settles, sorts and enqueues; decides nothing about the files."""

    def __init__(
        self,
        scanner: Scanner,
        work: WorkQueue,
        *,
        watch: bool = True,
        once: bool = False,
        finishing: Callable[[], bool] = lambda: False,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(name="subwatch-feeder", daemon=True)
        self.scanner = scanner
        self.work = work
        self.once = once
        self.finishing = finishing
        self.on_depth = on_depth
        self.watcher = (
            Watcher(
                scanner.root,
                self.report,
                mode=scanner.cfg.mode,
                recursive=scanner.cfg.recursive,
                poll_seconds=scanner.cfg.poll_seconds,
            )
            if watch and not once
            else None
        )
        self.first_pass = threading.Event()  # the start-up scan is done and its start queued
        self.drained = threading.Event()  # finishing, and nothing more to hand out
        self.halt = threading.Event()
        self.failure: BaseException | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._reported: set[Path] = set()
        self.deferred = 0  # ready files that did not fit in the queue at the last pass

    # -- called from other threads -----------------------------------------------------------

    def report(self, path: Path) -> None:
        """An observer saw ``path`` change (watchdog's thread; never blocks)."""
        with self._lock:
            self._reported.add(path)
        self._wake.set()

    def wake(self) -> None:
        """The worker has room in the queue again."""
        self._wake.set()

    def stop(self) -> None:
        self.halt.set()
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Files ready but not taken yet: queued plus deferred."""
        return self.work.qsize() + self.deferred

    # -- the thread --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a defect here must stop the daemon, not stall it
            log.exception("the folder watcher failed")
            self.failure = exc
        finally:
            if self.watcher is not None:
                self.watcher.stop()

    def _loop(self) -> None:
        if self.watcher is not None:
            self.watcher.start()
        next_rescan = time.monotonic()  # the start-up scan is a full one
        while not self.halt.is_set():
            finishing = self.once or self.finishing()
            full = finishing or time.monotonic() >= next_rescan
            if self.watcher is not None and self.watcher.check():
                full = True
            with self._lock:
                reported, self._reported = self._reported, set()
            if full:
                found = self.scanner.poll(final=self.once)
                next_rescan = time.monotonic() + self.scanner.cfg.rescan_seconds
            elif reported or self.scanner.pending:
                found = self.scanner.poll(final=self.once, paths=reported)
            else:
                found = []
            self._enqueue(found)
            self.first_pass.set()
            if full and finishing and not found and not self.scanner.pending:
                self.drained.set()
                return
            self._pause()

    def _enqueue(self, found: list[Candidate]) -> None:
        """Queue in capture order; hand back to the scanner what does not fit."""
        self.deferred = 0
        for i, candidate in enumerate(found):
            try:
                self.work.put_nowait(candidate)
            except queue.Full:
                for rest in found[i:]:
                    self.scanner.defer(rest)
                self.deferred = len(found) - i
                log.debug("queue full: %d ready files wait for the next pass", self.deferred)
                break
        if self.on_depth is not None and found:
            self.on_depth(self.backlog)

    def _pause(self) -> None:
        """Sleep until reports arrive (then let their burst finish), the worker has room, or
        it is time for the next settle check."""
        if not self._wake.wait(self.scanner.cfg.poll_seconds):
            return
        self._wake.clear()
        deadline = time.monotonic() + self.scanner.cfg.poll_seconds
        while self._has_reports() and time.monotonic() < deadline and not self.halt.is_set():
            if not self._wake.wait(BURST_QUIET):
                return
            self._wake.clear()

    def _has_reports(self) -> bool:
        with self._lock:
            return bool(self._reported)
