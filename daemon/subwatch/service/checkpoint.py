"""Checkpoints: everything a restart needs to carry on as if the process had never stopped.

A checkpoint holds, per stack, its accumulator arrays (and warm-up buffer), its reference stars
and its gate history; and, for the whole run, the set of files already handled (with size,
mtime, outcome and content fingerprint), the calibration frames seen, and the length of
``frames.jsonl`` at that moment. It is written as generation-numbered ``.npz`` files, then one
``checkpoint.json`` naming them, each atomically (temp file, fsync, rename); the rename of
``checkpoint.json`` is the single moment a new checkpoint becomes the truth, so a kill at any
instant leaves either the old one or the new one, never a mixture.

On restart the journal is cut back to the recorded length: rows written after the checkpoint
describe work whose effect on the stacks was lost with the process, so those files are simply
processed again, and the final stack equals that of an uninterrupted run. A checkpoint that
cannot be read is set aside (renamed, never deleted) and the stacks are rebuilt from the frames
on disk.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from subwatch.frames.outputs import atomic_write_bytes, write_json_atomic

log = logging.getLogger(__name__)

FOLDER = ".checkpoint"
# 2: each handled file also carries its content fingerprint (see ``ledger``). Version 1
# checkpoints load as they are: their entries simply have no fingerprint.
VERSION = 2
READABLE = (1, 2)


class CheckpointError(Exception):
    """The checkpoint exists but cannot be trusted."""


@dataclass
class CheckpointState:
    journal_offset: int
    processed: dict[str, list[Any]]  # relative path -> [size, mtime, status, fingerprint]
    calibration: list[dict[str, Any]]  # {"path": relative path, "meta": FrameMeta fields}
    counts: dict[str, int]
    stacks: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=list)
    generation: int = 0


def save_checkpoint(output: Path, state: CheckpointState) -> None:
    folder = Path(output) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    generation = state.generation + 1
    names = []
    for i, (meta, arrays) in enumerate(state.stacks):
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        name = f"stack-{generation:06d}-{i:03d}.npz"
        atomic_write_bytes(folder / name, buf.getvalue())
        names.append(name)
    doc = {
        "version": VERSION,
        "generation": generation,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "journal_offset": state.journal_offset,
        "processed": state.processed,
        "calibration": state.calibration,
        "counts": state.counts,
        "stacks": names,
    }
    write_json_atomic(folder / "checkpoint.json", doc)
    state.generation = generation
    for old in folder.glob("stack-*.npz"):
        if old.name not in names:
            old.unlink(missing_ok=True)


def load_checkpoint(output: Path) -> CheckpointState | None:
    """The last checkpoint, None if there is none; ``CheckpointError`` if it is damaged."""
    folder = Path(output) / FOLDER
    index = folder / "checkpoint.json"
    if not index.exists():
        return None
    try:
        doc = json.loads(index.read_text())
        if doc.get("version") not in READABLE:
            raise CheckpointError(f"checkpoint version {doc.get('version')} is not {VERSION}")
        stacks = []
        for name in doc["stacks"]:
            with np.load(folder / name, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files if k != "meta"}
                meta = json.loads(str(npz["meta"]))
            stacks.append((meta, arrays))
        return CheckpointState(
            journal_offset=int(doc["journal_offset"]),
            processed={str(k): list(v) for k, v in doc["processed"].items()},
            calibration=list(doc["calibration"]),
            counts={str(k): int(v) for k, v in doc["counts"].items()},
            stacks=stacks,
            generation=int(doc["generation"]),
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{type(exc).__name__}: {exc}") from exc


def set_aside(output: Path) -> Path | None:
    """Move a damaged checkpoint out of the way (kept for inspection, never deleted)."""
    folder = Path(output) / FOLDER
    if not folder.exists():
        return None
    dest = folder.with_name(f"{FOLDER}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    shutil.move(str(folder), str(dest))
    return dest
