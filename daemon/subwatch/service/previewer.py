"""Previews off the per-frame path: when a stack is due, and who renders it.

A preview of a 26 MP stack (gradient fit, SNR map, PSF, deconvolution, stretches) takes far
longer than a sub, so it must never hold the worker up. Three pieces keep it out of the way:

- ``PreviewSchedule`` says when a stack is due: after ``previews.every_frames`` newly stacked
  subs, or ``previews.every_seconds`` after the last request if new subs came in since.
- ``Previewer.request`` notes a due stack: at most one request is pending per stack, a newer
  one replacing the older (and keeping its place in line), so a backlog of frames never
  becomes a backlog of previews. ``Previewer.feed``, called by the per-frame thread between
  frames, takes the snapshot (a private copy of the stack's mean image: 0.05 s at 26 MP)
  only when the renderer is free to take it: no copy is made to be thrown away, a pending
  preview holds no memory, and the preview shows the stack as it is when it starts.
- A dispatcher thread hands each snapshot to a **separate process** (``mode="process"``, the
  default: multiprocessing 'spawn', started on first use and kept, at niceness 19, so the
  per-frame path wins the CPU whenever both want it, and holding no GIL of ours; the image
  crosses through shared memory, not a pipe) or renders it on itself (``mode="thread"``: no
  start-up cost, for tests). docs/decisions.md has the measurements behind the default, and
  why the process is not put in the SCHED_IDLE class (``ProcessRunner(idle=True)``).

A preview that fails is one log line; the next request runs as usual (a process that died is
started again). ``close`` either lets the pending previews finish (end of ``--once``) or
abandons them (a stop: a killed preview leaves its previous products, every write is atomic).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from subwatch.enhance.previews import PreviewRenderer, PreviewRequest, one_line
from subwatch.service.allocator import keep_freed_memory

if TYPE_CHECKING:
    from subwatch.config import PreviewsConfig

log = logging.getLogger(__name__)

Key = tuple[str, str]
Render = Callable[[PreviewRequest], dict[str, Any]]
# Called once where previews are made (in the worker process, or the thread) to build the
# render function; must be picklable for the process mode (a class or module-level function).
RenderFactory = Callable[[], Render]
OnResult = Callable[[PreviewRequest, dict[str, Any]], None]
# Makes a stack's preview request (a copy of the stack): called on the thread owning the stack.
Snapshot = Callable[[], PreviewRequest]

NICE = 19  # added niceness of the preview process (and of the preview thread); 19 is the lowest
POLL = 0.2  # how often a wait looks at its stop flag, s


class PreviewError(Exception):
    """A preview that failed; the message is one line for the log."""


# -- cadence --------------------------------------------------------------------------------


@dataclass
class _Mark:
    frames: int
    when: float


class PreviewSchedule:
    """Per stack, the frames and time of the last request, and whether the next is due."""

    def __init__(self) -> None:
        self._marks: dict[Key, _Mark] = {}

    def mark(self, key: Key, frames: int, when: float | None = None) -> None:
        self._marks[key] = _Mark(frames, time.monotonic() if when is None else when)

    def frames(self, key: Key) -> int:
        mark = self._marks.get(key)
        return mark.frames if mark is not None else 0

    def due(self, key: Key, frames: int, cfg: PreviewsConfig, now: float | None = None) -> bool:
        """``every_frames`` new subs since the last request, or ``every_seconds`` with any."""
        now = time.monotonic() if now is None else now
        mark = self._marks.get(key)
        if mark is None:
            # A stack seen for the first time starts its clock now.
            mark = self._marks[key] = _Mark(0, now)
        new = frames - mark.frames
        if new <= 0:
            return False
        return new >= cfg.every_frames or now - mark.when >= cfg.every_seconds


# -- runners: where a preview is rendered ---------------------------------------------------


class _Runner(Protocol):
    def run(self, request: PreviewRequest, abort: threading.Event) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _lower_priority_of_this_thread(nice: int) -> None:
    """On Linux niceness is per thread: lower the calling thread's priority (best effort)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        pass


class ThreadRunner:
    """Renders on the calling (dispatcher) thread; the render function is built there."""

    def __init__(self, factory: RenderFactory, nice: int = NICE) -> None:
        self.factory = factory
        self.nice = nice
        self._render: Render | None = None

    def run(self, request: PreviewRequest, abort: threading.Event) -> dict[str, Any]:
        if self._render is None:
            _lower_priority_of_this_thread(self.nice)
            self._render = self.factory()
        return self._render(request)

    def close(self) -> None:
        self._render = None


def _lower_priority_of_this_process(nice: int, idle: bool) -> None:
    """Niceness up by ``nice`` and, with ``idle`` on Linux, the SCHED_IDLE class (the process
    then runs only on CPU time nothing else wants). Called before any thread starts, so the
    pools that numpy, OpenCV and the deconvolver start later inherit it."""
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
    if idle and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _render_shared(
    render: Render, request: PreviewRequest, name: str, shape: tuple[int, ...], dtype: str
) -> dict[str, Any]:
    """Render with the snapshot read in place from the parent's shared memory (the preview
    cycle makes its own working copy first, so this saves one full-size copy)."""
    shm = SharedMemory(name=name)
    try:
        request.snapshot.image = np.ndarray(shape, dtype, buffer=shm.buf)
        return render(request)
    finally:
        request.snapshot.image = np.empty((0,), np.float32)
        with contextlib.suppress(BufferError):  # a render kept a view: it keeps the mapping
            shm.close()


def _child_main(conn: Connection, factory: RenderFactory, nice: int, idle: bool) -> None:
    """The preview process: render what the parent sends until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the daemon, which stops us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGTERM (the parent abandoning a preview) unwinds, so atomic writes remove their temps.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _lower_priority_of_this_process(nice, idle)
    # A spawned process starts with the allocator's defaults: each full-size temporary of a
    # cycle would be a fresh mmap, faulted in page by page (see service/allocator.py).
    keep_freed_memory()
    render = factory()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the daemon is gone
        request, (name, shape, dtype) = message
        try:
            reply: tuple[str, Any] = ("ok", _render_shared(render, request, name, shape, dtype))
        except Exception as exc:
            reply = ("error", one_line(exc))
            log.debug("preview failed", exc_info=True)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class ProcessRunner:
    """Renders in one long-lived, niced 'spawn' process; started on first use, restarted if
    it dies. ``idle`` also puts it in Linux's SCHED_IDLE class: frames are then not slowed at
    all, but any other busy process (another daemon, a plate solve, a test run) starves the
    previews completely, the final ones of ``--once`` included."""

    def __init__(self, factory: RenderFactory, nice: int = NICE, idle: bool = False) -> None:
        self.factory = factory
        self.nice = nice
        self.idle = idle
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        self._stop_process()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(child, self.factory, self.nice, self.idle),
            name="subwatch-previews",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        log.debug("preview process %d started", proc.pid)
        return parent

    def run(self, request: PreviewRequest, abort: threading.Event) -> dict[str, Any]:
        conn = self._start()
        image = np.ascontiguousarray(request.snapshot.image, dtype=np.float32)
        shape = image.shape
        shm = SharedMemory(create=True, size=max(1, image.nbytes))
        try:
            np.copyto(np.ndarray(shape, np.float32, buffer=shm.buf), image)
            del image
            shipped = PreviewRequest(
                request.snapshot.without_image(),
                request.out_dir,
                request.options,
                request.requested,
            )
            request.snapshot.image = np.empty((0,), np.float32)  # the process has its copy
            conn.send((shipped, (shm.name, shape, "float32")))
            return self._wait(conn, abort)
        finally:
            shm.close()
            shm.unlink()

    def _wait(self, conn: Connection, abort: threading.Event) -> dict[str, Any]:
        while not conn.poll(POLL):
            if abort.is_set():
                self._stop_process(busy=True)
                raise PreviewError("abandoned: stopping")
            if self._proc is None or not self._proc.is_alive():
                code = None if self._proc is None else self._proc.exitcode
                self._proc = self._conn = None
                raise PreviewError(f"the preview process died (exit code {code})")
        try:
            status, payload = conn.recv()
        except (EOFError, OSError) as exc:
            self._stop_process()
            raise PreviewError("the preview process died") from exc
        if status != "ok":
            raise PreviewError(str(payload))
        return payload

    def _stop_process(self, busy: bool = False) -> None:
        """An idle process ends on the closed pipe; a busy one is terminated (SIGTERM)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(timeout=0 if busy else 2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)

    def close(self) -> None:
        self._stop_process()


# -- the previewer --------------------------------------------------------------------------


class Previewer:
    """Stacks due for a preview, and the thread that renders them one at a time.

    The per-frame thread calls ``request(key, snapshot)`` when a stack is due and ``feed()``
    between frames. ``request`` only notes the stack (a newer request replaces the pending one
    and keeps its place in line); ``feed`` calls ``snapshot()``, which copies the stack, only
    when the renderer is free to take it. So a snapshot is never taken to be thrown away, a
    pending preview holds no memory, and what is rendered is the stack as it is when the
    renderer gets to it. ``on_result(request, status)`` runs on the dispatcher thread after
    each preview that worked; it must be thread-safe with respect to the per-frame thread.
    """

    def __init__(
        self,
        *,
        mode: str = "process",
        factory: RenderFactory = PreviewRenderer,
        on_result: OnResult | None = None,
        nice: int = NICE,
    ) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        self.mode = mode
        self.runner: _Runner = (
            ProcessRunner(factory, nice) if mode == "process" else ThreadRunner(factory, nice)
        )
        self.on_result = on_result
        self._pending: OrderedDict[Key, Snapshot] = OrderedDict()
        self._cond = threading.Condition()
        self._job: PreviewRequest | None = None  # handed over, not yet taken by the dispatcher
        self._busy: Key | None = None  # handed over or rendering
        self._closing = False
        self._abort = threading.Event()
        self.done = 0
        self.failed = 0
        self.replaced = 0
        self._thread = threading.Thread(target=self._loop, name="previews", daemon=True)
        self._thread.start()

    # -- the per-frame thread's side -----------------------------------------------------------

    def request(self, key: Key, snapshot: Snapshot) -> None:
        """Note that ``key`` is due; ``snapshot()`` makes its request when it is its turn."""
        with self._cond:
            if self._closing:
                return
            if key in self._pending:
                self.replaced += 1
                log.debug("preview of %s/%s: a newer request replaces the pending one", *key)
            self._pending[key] = snapshot  # an existing key keeps its place in line
        self.feed()

    def feed(self) -> bool:
        """If the renderer is free, snapshot the stack longest due and hand it over.

        Call it from the thread that owns the stacks, between frames; True if it handed one.
        """
        with self._cond:
            if self._busy is not None or not self._pending or self._closing:
                return False
            key, snapshot = self._pending.popitem(last=False)
            self._busy = key
        try:
            job = snapshot()
        except Exception as exc:
            log.error("preview of %s/%s: no snapshot: %s", *key, one_line(exc))
            job = None
        with self._cond:
            self._job = job
            if job is None:
                self._busy = None
            self._cond.notify_all()
        return job is not None

    def pending(self) -> list[Key]:
        with self._cond:
            return list(self._pending)

    @property
    def busy(self) -> Key | None:
        return self._busy

    def wait_idle(self, timeout: float | None = None, stop: threading.Event | None = None) -> bool:
        """Feed and wait until nothing is pending or rendering (from the stacks' thread);
        False on timeout or when ``stop`` is set."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self.feed()
            with self._cond:
                if not self._pending and self._busy is None:
                    return True
                if stop is not None and stop.is_set():
                    return False
                left = POLL if end is None else min(POLL, end - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)

    def close(self, *, drain: bool, stop: threading.Event | None = None) -> None:
        """Stop the dispatcher: after the pending previews (``drain``) or abandoning them."""
        if drain:
            self.wait_idle(stop=stop)
        with self._cond:
            self._closing = True
            self._pending.clear()
            self._job = None
            self._cond.notify_all()
        self._abort.set()
        if self.mode == "process" or self._busy is None:
            self._thread.join(timeout=10)
        self.runner.close()

    # -- the dispatcher thread -----------------------------------------------------------------

    def _next(self) -> PreviewRequest | None:
        with self._cond:
            while self._job is None and not self._closing:
                self._cond.wait()
            job, self._job = self._job, None
            return None if self._closing else job

    def _loop(self) -> None:
        while True:
            request = self._next()
            if request is None:
                return
            self._render(request)
            with self._cond:
                self._busy = None
                self._cond.notify_all()

    def _render(self, request: PreviewRequest) -> None:
        key = request.key
        started = time.monotonic()
        try:
            status = self.runner.run(request, self._abort)
        except Exception as exc:
            self.failed += 1
            if not self._abort.is_set():
                why = str(exc) if isinstance(exc, PreviewError) else one_line(exc)
                log.error("preview of %s/%s failed: %s", *key, why)
            return
        self.done += 1
        log.info(
            "preview of %s/%s: %d subs, %.1f s",
            *key,
            request.snapshot.n_frames,
            time.monotonic() - started,
        )
        if self.on_result is not None:
            try:
                self.on_result(request, status)
            except Exception as exc:
                log.error("preview of %s/%s not recorded: %s", *key, one_line(exc))
