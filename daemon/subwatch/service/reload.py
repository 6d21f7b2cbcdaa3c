"""SIGHUP: which changes of the config file can apply to a running daemon, and which cannot.

Thresholds and cadences are read by the pipeline for every frame, so new gate limits, logging,
checkpoint and preview cadences, stacking options for new stacks and the watch timings apply
from the next frame. What the daemon built its world from at start-up cannot change under it:
the folders (the watch folder is being observed, the output holds the checkpoint and the
journal, the calibration library is indexed), how the folder is observed, the frame size limit
(masters and stacks were sized with it), and the HTTP listener. Those changes are kept aside
and logged as needing a restart; the rest of the new file applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from subwatch.config import Config

# Dotted prefixes of the keys that only a restart can change.
RESTART_ONLY = (
    "watch.path",
    "watch.mode",
    "watch.recursive",
    "watch.poll_seconds",
    "output",
    "calibration",
    "frames",
    "http",
)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


@dataclass(frozen=True)
class Reloaded:
    config: Config  # the new file, with the restart-only keys as they were
    applied: list[Change]
    need_restart: list[Change]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def needs_restart(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_ONLY)


def reconcile(running: Config, loaded: Config) -> Reloaded:
    """Split the differences between the running config and a freshly loaded one."""
    old, new = _flat(running.model_dump(mode="json")), _flat(loaded.model_dump(mode="json"))
    changes = [Change(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())]
    changes = [c for c in changes if c.old != c.new]
    applied = [c for c in changes if not needs_restart(c.key)]
    held = [c for c in changes if needs_restart(c.key)]
    data = loaded.model_dump()
    kept = running.model_dump()
    for change in held:
        section, _, field = change.key.partition(".")
        data[section][field] = kept[section][field]
    return Reloaded(Config.model_validate(data), applied, held)
