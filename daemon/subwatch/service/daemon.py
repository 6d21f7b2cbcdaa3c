"""The daemon: a watcher side that finds complete frames, a worker that processes them.

Threads, and what each may do:

- watchdog's observer (``watcher``) reports paths that changed; nothing else.
- the feeder (``feeder``) asks the scanner which reported files are complete, sorts them by
  capture time and puts them on a bounded queue; at start-up and every
  ``watch.rescan_seconds`` it rescans the whole folder.
- the worker, the thread that calls ``Daemon.run`` (the main thread under ``subwatch run``),
  takes one file at a time: asks the ledger whether it was already taken, runs the pipeline,
  checkpoints, and keeps systemd, the metrics and the status up to date. The pipeline and its
  state are touched by this thread only.
- the preview dispatcher (``previewer``) renders previews of snapshots the worker hands it
  (in a separate, low-priority process by default) and merges their numbers into status.json; it
  never touches the stacks.
- the HTTP server (``web``) reads the output folder, the metrics and ``status()``.

Signals only set flags (``request_stop``, ``request_reload``); the worker acts on them between
frames, so a stop always finishes the current frame, writes the stacks and a checkpoint.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subwatch import __version__
from subwatch.config import Config
from subwatch.frames import JsonlWriter
from subwatch.service.allocator import keep_freed_memory
from subwatch.service.checkpoint import CheckpointError, load_checkpoint, set_aside
from subwatch.service.feeder import QUEUE_SIZE, Feeder, WorkQueue
from subwatch.service.ledger import Ledger, fingerprint
from subwatch.service.logs import setup_logging
from subwatch.service.metrics import Metrics
from subwatch.service.notify import Notifier, status_line
from subwatch.service.pipeline import Pipeline
from subwatch.service.previewer import Previewer, PreviewSchedule, RenderFactory
from subwatch.service.reload import reconcile
from subwatch.service.scanner import Candidate, Scanner

if TYPE_CHECKING:
    from subwatch.enhance.previews import PreviewRequest
    from subwatch.service.web import WebServer

log = logging.getLogger(__name__)

TICK = 0.5  # longest the worker waits for work before looking at flags and pinging systemd


@dataclass
class RunSummary:
    processed: int
    counts: dict[str, int]
    stacks: dict[str, int]
    output: Path


def _set_aside_previous_journal(output: Path) -> None:
    """A fresh start keeps any previous journal beside the new one, never overwritten."""
    journal = output / "frames.jsonl"
    if journal.exists() and journal.stat().st_size > 0:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        dest = output / f"frames.{stamp}.jsonl"
        shutil.move(journal, dest)
        log.info("previous journal kept as %s", dest.name)


def _resume(output: Path, pipeline: Pipeline, scanner: Scanner) -> bool:
    """Continue from the output's checkpoint if there is a sound one; True if resumed."""
    try:
        state = load_checkpoint(output)
    except CheckpointError as exc:
        where = set_aside(output)
        log.warning(
            "checkpoint unreadable (%s), set aside as %s; rebuilding from the frames", exc, where
        )
        state = None
    if state is None:
        _set_aside_previous_journal(output)
        pipeline.journal = JsonlWriter(output / "frames.jsonl")
        return False
    dropped = pipeline.journal.truncate(state.journal_offset)
    pipeline.restore(state)
    for rel, entry in state.processed.items():
        if entry[2] == "waiting":
            # Seen, not handled: followed again (it may complete, or turn out incomplete).
            scanner.mark_waiting(pipeline.root / rel)
        else:
            scanner.mark_handled(pipeline.root / rel, entry[0], entry[1])
    stacked = sum(s.stacked for s in pipeline.stacks.values())
    log.info(
        "resumed from checkpoint: %d files handled, %d subs in %d stacks; %d journal rows redone",
        len(state.processed),
        stacked,
        len(pipeline.stacks),
        dropped,
    )
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Daemon:
    """One run over one watch folder; ``run`` returns when stopped or, finishing, when done.

    ``once``: process what is in the folder, then return. ``idle_exit``: when set by another
    thread (the demo's simulator, after its last frame), return as soon as nothing is pending.
    ``reload_config``: how SIGHUP gets the new config (the file plus the command-line flags).
    ``serve_http``: None serves when ``http.enabled`` and not ``once``.
    ``preview_mode``: where previews are rendered, ``"process"`` or ``"thread"``;
    ``preview_factory`` builds the render function there (tests pass stand-ins).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        once: bool = False,
        stop: threading.Event | None = None,
        idle_exit: threading.Event | None = None,
        reload_config: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        serve_http: bool | None = None,
        queue_size: int = QUEUE_SIZE,
        pipeline_hook: Callable[[Pipeline], None] | None = None,
        preview_mode: str = "process",
        preview_factory: RenderFactory | None = None,
    ) -> None:
        if cfg.watch.path is None:
            raise ValueError("no watch folder: give --watch or watch.path")
        keep_freed_memory()
        self.cfg = cfg
        self.once = once
        self.stop = stop or threading.Event()
        self.idle_exit = idle_exit
        self.reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        self.serve_http = (cfg.http.enabled and not once) if serve_http is None else serve_http
        self.queue = WorkQueue(queue_size)
        self.pipeline_hook = pipeline_hook
        self.web: WebServer | None = None  # once listening (aiohttp is imported only then)
        self.started = _now()
        self.processed = 0
        self._reload = threading.Event()
        self._snapshot: dict[str, Any] = {}
        self.state = "starting"  # starting, watching, reloading, stopping: for the live page
        self._last_fwhm: float | None = None
        self.feeder: Feeder | None = None
        self.pipeline: Pipeline | None = None
        self.ledger = Ledger({})
        self.preview_mode = preview_mode
        self.preview_factory = preview_factory
        self.previewer: Previewer | None = None
        self.schedule = PreviewSchedule()

    # -- called from signal handlers and other threads -----------------------------------------

    def request_stop(self) -> None:
        self.stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def status(self) -> dict[str, Any]:
        """The live status for ``/api/status``: a snapshot the worker refreshes every frame."""
        doc = dict(self._snapshot)
        doc["queue_depth"] = self.feeder.backlog if self.feeder is not None else 0
        doc["state"] = self.state
        return doc

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        pipeline, feeder = self._prepare()
        output = pipeline.output
        try:
            if self.serve_http:
                self._start_web(output)
            if self.pipeline_hook is not None:
                self.pipeline_hook(pipeline)
            feeder.start()
            while not feeder.first_pass.wait(TICK):
                if self.stop.is_set() or not feeder.is_alive():
                    break
            self.notifier.ready(self._status_text())
            self.state = "watching"
            log.info(
                "watching %s, writing to %s%s",
                pipeline.root,
                output,
                " (once)" if self.once else "",
            )
            self._work()
        finally:
            self.state = "stopping"
            self.notifier.stopping()
            feeder.stop()
            if feeder.is_alive():
                feeder.join(timeout=10)
            try:
                pipeline.finish()
            finally:
                try:
                    self._finish_previews()
                finally:
                    if self.web is not None:
                        self.web.stop()
        if feeder.failure is not None:
            raise RuntimeError("the folder watcher failed") from feeder.failure
        stacks = {f"{s.target}/{s.filter}": s.stacked for s in pipeline.stacks.values()}
        log.info("done: %d files, %s", self.processed, pipeline.counts)
        return RunSummary(self.processed, dict(pipeline.counts), stacks, output)

    def _prepare(self) -> tuple[Pipeline, Feeder]:
        """The pipeline (resumed from the checkpoint), the ledger, the scanner and the feeder."""
        cfg = self.cfg
        assert cfg.watch.path is not None
        watch, output = Path(cfg.watch.path), Path(cfg.output.path)
        if not watch.is_dir():
            raise FileNotFoundError(f"watch folder {watch} does not exist")
        output.mkdir(parents=True, exist_ok=True)
        if _inside(output, watch):
            log.info("output %s lies inside the watch folder; it is skipped when scanning", output)
        pipeline = self.pipeline = Pipeline(cfg, watch, output)
        scanner = Scanner(
            watch, cfg.watch, exclude=[output], max_dimension=cfg.frames.max_dimension
        )
        _resume(output, pipeline, scanner)
        self.ledger = Ledger(pipeline.processed)
        pipeline.listeners.append(self.metrics.observe_row)
        for session in pipeline.stacks.values():
            self.metrics.observe_stack(pipeline.stack_status(session))
            done = pipeline.preview_status.get(session.key, {}).get("preview", {})
            self.schedule.mark(session.key, int(done.get("frames") or 0))
        if cfg.previews.enabled:
            self._start_previewer()
        idle = self.idle_exit
        feeder = self.feeder = Feeder(
            scanner,
            self.queue,
            once=self.once,
            finishing=idle.is_set if idle is not None else lambda: False,
            on_depth=self.metrics.set_queue_depth,
        )
        self._refresh(None)
        return pipeline, feeder

    def _start_web(self, output: Path) -> None:
        from subwatch.service.web import WebServer

        web = WebServer(self.cfg.http, output, self.metrics, self.status)
        try:
            web.start()
        except OSError as exc:
            # The page is a window on the night, not the night: stacking goes on without it.
            log.error("%s; running without the live page and metrics", exc)
            return
        self.web = web

    def _work(self) -> None:
        """Take files off the queue one at a time until stopped or, finishing, drained."""
        assert self.feeder is not None and self.pipeline is not None
        feeder, pipeline = self.feeder, self.pipeline
        interval = self.notifier.watchdog_interval()
        wait = min(TICK, interval) if interval else TICK
        while not self.stop.is_set():
            # Pinged from here, between frames, so a stuck frame stops the pings.
            self.notifier.watchdog()
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload()
            try:
                candidate = self.queue.get(timeout=wait)
            except queue.Empty:
                if feeder.drained.is_set() and self.queue.empty():
                    return
                if not feeder.is_alive():
                    log.error("the folder watcher stopped; shutting down")
                    return
                if pipeline.checkpoint_due():
                    pipeline.checkpoint()
                self._request_previews()
                continue
            if self.queue.qsize() <= self.queue.maxsize // 2:
                feeder.wake()
            row = self._handle(candidate)
            while pipeline.retry:
                again = pipeline.retry.pop(0)
                try:
                    st = again.stat()
                except OSError as exc:
                    log.warning("%s: not tried again: %s", again.name, exc)
                    continue
                retried = pipeline.process(again, st.st_size, st.st_mtime)
                self.ledger.taken(retried["file"], _identity(again), retried)
            if pipeline.checkpoint_due():
                pipeline.checkpoint()
            if row is not None:
                self.processed += 1
            self._refresh(row)
            self._request_previews()

    def _handle(self, candidate: Candidate) -> dict[str, Any] | None:
        """One file from the queue to one journal row (none for a touched, unchanged file)."""
        assert self.pipeline is not None
        pipeline = self.pipeline
        path, size, mtime = candidate.path, candidate.size, candidate.mtime
        rel = str(path.relative_to(pipeline.root))
        if candidate.state != "ready":
            row = pipeline.error_row(path, candidate.reason or candidate.state, size, mtime)
            if candidate.state in ("waiting", "incomplete"):
                row["status"] = candidate.state
            # One line each, no traceback: these are the folder's problems, not ours.
            level = logging.INFO if candidate.state == "waiting" else logging.WARNING
            log.log(level, "%s: %s", rel, row["reason"])
            pipeline.record(row)
            return row
        verdict = self.ledger.judge(rel, candidate.fingerprint)
        if verdict.action == "skip":
            log.debug("%s touched, content unchanged: already done", rel)
            return None
        if verdict.action == "process":
            row = pipeline.process(path, size, mtime)
            self.ledger.taken(rel, candidate.fingerprint, row)
            return row
        row = pipeline.error_row(path, verdict.reason or verdict.action, size, mtime)
        if verdict.action == "changed":
            log.warning("%s changed after it was stacked; reported, not stacked again", rel)
            pipeline.record(row)
            self.ledger.changed(rel, size, mtime)
        else:
            log.info("%s: %s; not stacked again", rel, verdict.reason)
            row["status"] = "duplicate"
            pipeline.record(row)
            self.ledger.taken(rel, candidate.fingerprint, row)
        return row

    # -- previews ------------------------------------------------------------------------------

    def _start_previewer(self) -> Previewer:
        """The preview dispatcher; its process starts with the first preview."""
        options: dict[str, Any] = {"mode": self.preview_mode, "on_result": self._preview_done}
        if self.preview_factory is not None:
            options["factory"] = self.preview_factory
        self.previewer = Previewer(**options)
        return self.previewer

    def _request_previews(self, *, final: bool = False) -> None:
        """Tell the previewer which stacks are due (``final``: each with subs added since its
        last preview), and let it take a snapshot if it is free: between frames, on this
        thread, the only one that changes the stacks."""
        previewer, pipeline = self.previewer, self.pipeline
        if pipeline is None or not self.cfg.previews.enabled:
            return
        if previewer is None:  # turned on by a reload
            previewer = self._start_previewer()
        for session in list(pipeline.stacks.values()):
            if not session.has_reference:
                continue
            key, frames = session.key, session.stacked
            if final:
                due = frames > self.schedule.frames(key)
            else:
                due = self.schedule.due(key, frames, self.cfg.previews)
            if due:
                previewer.request(key, partial(pipeline.preview_request, session))
                self.schedule.mark(key, frames)
        previewer.feed()

    def _preview_done(self, request: PreviewRequest, status: dict[str, Any]) -> None:
        """On the preview thread: status.json, and the preview timings and stack SNR metrics."""
        assert self.pipeline is not None
        doc = self.pipeline.merge_preview(request.key, status)
        for product, seconds in status.get("preview", {}).get("product_seconds", {}).items():
            self.metrics.observe_preview(seconds, product)
        self.metrics.observe_stack(doc)

    def _finish_previews(self) -> None:
        """A run that finishes (``--once``, the demo) renders its final previews and waits for
        them; a stop abandons what is pending."""
        previewer = self.previewer
        if previewer is None:
            return
        finishing = not self.stop.is_set() and (
            self.once or (self.idle_exit is not None and self.idle_exit.is_set())
        )
        if finishing:
            self._request_previews(final=True)
            if previewer.pending() or previewer.busy is not None:
                log.info("rendering the final previews")
        previewer.close(drain=finishing, stop=self.stop)

    # -- reporting -----------------------------------------------------------------------------

    def _frames_done(self) -> int:
        assert self.pipeline is not None
        return sum(n for status, n in self.pipeline.counts.items() if status != "waiting")

    def _status_text(self) -> str:
        backlog = self.feeder.backlog if self.feeder is not None else 0
        return status_line(self._frames_done(), backlog, self._last_fwhm)

    def _refresh(self, row: dict[str, Any] | None) -> None:
        """After a frame: metrics for its stack, systemd's status line, the web snapshot."""
        assert self.pipeline is not None and self.feeder is not None
        pipeline = self.pipeline
        if row is not None and row.get("kind") == "light" and row.get("fwhm") is not None:
            self._last_fwhm = row["fwhm"]
        session = pipeline.stacks.get((row["target"], row["filter"])) if row else None
        if session is not None:
            self.metrics.observe_stack(pipeline.stack_status(session))
        self.metrics.set_queue_depth(self.feeder.backlog)
        if row is not None:
            self.notifier.status(self._status_text())
        last = row if row is not None else self._snapshot.get("last_frame")
        watcher = self.feeder.watcher
        self._snapshot = {
            "version": __version__,
            "started": self.started,
            "watch": str(pipeline.root),
            "output": str(pipeline.output),
            "watch_mode": watcher.mode if watcher is not None else "once",
            "frames_done": self._frames_done(),
            "counts": dict(pipeline.counts),
            "stacks": [
                pipeline.stack_status(s) for s in pipeline.stacks.values() if s.has_reference
            ],
            "last_frame": last,
            "updated": _now(),
        }

    # -- SIGHUP --------------------------------------------------------------------------------

    def _apply_reload(self) -> None:
        """Re-read the config; apply what can change live, name what needs a restart."""
        assert self.pipeline is not None and self.feeder is not None
        self.notifier.reloading()
        self.state = "reloading"
        try:
            if self.reload_config is None:
                log.warning("reload requested, but there is no config file to read again")
                return
            try:
                loaded = self.reload_config()
                result = reconcile(self.cfg, loaded)
            except Exception as exc:  # a bad file must never take the night down
                log.error("config reload failed, keeping the running config: %s", exc)
                return
            old_logging = self.cfg.logging
            self.cfg = result.config
            self.pipeline.cfg = result.config
            self.feeder.scanner.cfg = result.config.watch
            if result.config.logging != old_logging:
                setup_logging(result.config.logging.level, result.config.logging.format)
            if result.applied:
                log.info("config reloaded: %s", "; ".join(map(str, result.applied)))
            else:
                log.info("config reloaded: no change that applies while running")
            for change in result.need_restart:
                log.warning("config reload: %s needs a restart to take effect", change)
        finally:
            self.state = "watching"
            self.notifier.ready(self._status_text())


def _identity(path: Path) -> str | None:
    try:
        return fingerprint(path)
    except OSError:
        return None


def run_daemon(
    cfg: Config,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    idle_exit: threading.Event | None = None,
    pipeline_hook: Callable[[Pipeline], None] | None = None,
    **options: Any,
) -> RunSummary:
    """Watch ``cfg.watch.path`` and stack into ``cfg.output.path`` (see ``Daemon``)."""
    daemon = Daemon(
        cfg, once=once, stop=stop, idle_exit=idle_exit, pipeline_hook=pipeline_hook, **options
    )
    return daemon.run()


def _inside(child: Path, parent: Path) -> bool:
    try:
        return child.resolve().is_relative_to(parent.resolve())
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (tests and the demo use it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
