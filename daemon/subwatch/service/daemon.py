"""The run loop: scan, process in capture order, write products, repeat until told to stop.

``run_daemon`` is the whole daemon minus the HTTP and systemd faces: it owns the scanner and the
pipeline, processes what became ready on each pass, writes the stacks every
``checkpoint_frames`` frames and at the end, and returns when ``stop`` is set or, with
``once``, when the folder holds nothing more to do.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from subwatch.config import Config
from subwatch.frames import JsonlWriter
from subwatch.service.checkpoint import CheckpointError, load_checkpoint, set_aside
from subwatch.service.pipeline import Pipeline
from subwatch.service.scanner import Scanner

log = logging.getLogger(__name__)


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
    for rel, (size, mtime, _status) in state.processed.items():
        scanner.mark_handled(pipeline.root / rel, size, mtime)
    stacked = sum(s.stacked for s in pipeline.stacks.values())
    log.info(
        "resumed from checkpoint: %d files handled, %d subs in %d stacks; %d journal rows redone",
        len(state.processed),
        stacked,
        len(pipeline.stacks),
        dropped,
    )
    return True


def run_daemon(
    cfg: Config,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    idle_exit: threading.Event | None = None,
    pipeline_hook: Callable[[Pipeline], None] | None = None,
) -> RunSummary:
    """Watch ``cfg.watch.path`` and stack into ``cfg.output.path``.

    ``idle_exit``: when set by another thread (the demo's simulator, when it has written its
    last frame), the loop exits as soon as nothing is pending, like ``once``.
    """
    if cfg.watch.path is None:
        raise ValueError("no watch folder: give --watch or watch.path")
    watch = Path(cfg.watch.path)
    output = Path(cfg.output.path)
    if not watch.is_dir():
        raise FileNotFoundError(f"watch folder {watch} does not exist")
    output.mkdir(parents=True, exist_ok=True)
    if _inside(output, watch):
        log.info("output %s lies inside the watch folder; it is skipped when scanning", output)
    stop = stop or threading.Event()
    pipeline = Pipeline(cfg, watch, output)
    scanner = Scanner(watch, cfg.watch, exclude=[output], max_dimension=cfg.frames.max_dimension)
    _resume(output, pipeline, scanner)
    if pipeline_hook is not None:
        pipeline_hook(pipeline)
    processed = 0
    log.info("watching %s, writing to %s%s", watch, output, " (once)" if once else "")
    while not stop.is_set():
        finishing = once or (idle_exit is not None and idle_exit.is_set())
        ready = scanner.poll(final=once)
        for cand in ready:
            if stop.is_set():
                break
            if cand.state == "ready":
                pipeline.process(cand.path, cand.size, cand.mtime)
            else:
                pipeline.record(
                    pipeline.error_row(cand.path, cand.reason or cand.state, cand.size, cand.mtime)
                )
            processed += 1
            while pipeline.retry:
                again = pipeline.retry.pop(0)
                st = again.stat()
                pipeline.process(again, st.st_size, st.st_mtime)
            if pipeline.checkpoint_due():
                pipeline.checkpoint()
        if finishing and not ready and not scanner.pending:
            break
        if not ready:
            stop.wait(0.05 if once else cfg.watch.poll_seconds)
    pipeline.finish()
    stacks = {f"{s.target}/{s.filter}": s.stacked for s in pipeline.stacks.values()}
    log.info("done: %d files, %s", processed, pipeline.counts)
    return RunSummary(processed, dict(pipeline.counts), stacks, output)


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
