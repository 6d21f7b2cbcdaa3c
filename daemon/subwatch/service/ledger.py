"""Exactly once: deciding, by name and by content, whether a file was already taken.

A path, a size and an mtime do not identify a frame. Backup tools and file managers touch files
(same bytes, new mtime), users rename them (``M42_0001.fits`` -> ``M42/L/0001.fits``), and some
tools rewrite a frame after the fact (plate solvers adding WCS cards). So each file gets a
*fingerprint* when it is taken: a hash of its size, its first 64 KiB and its last 64 KiB. The
first block holds the whole header of any FITS, XISF or TIFF a camera writes (DATE-OBS,
exposure, sensor temperature: no two subs share it), the last block the end of the pixels, so
two different subs never collide and a header or tail rewrite is seen; reading 128 KiB costs
the same whatever the sensor, where hashing a 120 MB file would cost a second per frame.

The ledger reads and annotates the pipeline's table of handled files (``Pipeline.processed``:
relative path -> ``[size, mtime, status, fingerprint]``), which is what the checkpoint saves,
rather than keeping a second table that could disagree with it after a crash. Entries written
before fingerprints existed have three fields and are still understood.

``Ledger.judge`` says what to do with a complete file:

- ``process``: new, or a new version of a file that was not stacked (a truncated file
  completed, a broken one replaced), or a file that failed with an error before;
- ``skip``: same name, same content (touched): nothing to do, nothing recorded;
- ``duplicate``: the content was already taken under another name (renamed or copied);
- ``changed``: a stacked file's content changed: reported, never stacked twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

BLOCK = 64 * 1024

# Outcomes after which a file's content is done with: it is never taken again. An ``error``
# (unreadable, out of memory) is not final: the same bytes may be tried again, which cannot count
# anything twice; ``waiting`` and ``incomplete`` describe a file that was not complete yet.
FINAL = frozenset({"stacked", "rejected", "calibration", "duplicate"})


def fingerprint(path: Path) -> str:
    """Size plus the first and last 64 KiB, hashed: the file's identity, cheap at any size."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        digest.update(fh.read(BLOCK))
        if size > BLOCK:
            fh.seek(max(BLOCK, size - BLOCK))
            digest.update(fh.read(BLOCK))
    return digest.hexdigest()


@dataclass(frozen=True)
class Verdict:
    action: Literal["process", "skip", "duplicate", "changed"]
    reason: str | None = None


def _field(entry: list[Any], index: int) -> Any:
    return entry[index] if len(entry) > index else None


class Ledger:
    """What has been done with each file, looked up by name and by fingerprint."""

    def __init__(self, entries: dict[str, list[Any]]) -> None:
        self.entries = entries
        self._by_content: dict[str, str] = {}
        for rel, entry in entries.items():
            fp = _field(entry, 3)
            if fp and entry[2] in FINAL:
                self._by_content.setdefault(fp, rel)

    def judge(self, rel: str, fp: str | None) -> Verdict:
        entry = self.entries.get(rel)
        if entry is not None and entry[2] in FINAL:
            if fp is not None and _field(entry, 3) == fp:
                return Verdict("skip")
            if entry[2] == "stacked":
                return Verdict("changed", "changed after stacking")
        earlier = self._by_content.get(fp) if fp is not None else None
        if earlier is not None and earlier != rel:
            status = self.entries[earlier][2]
            if status == "stacked":
                return Verdict("duplicate", f"already stacked as {earlier}")
            return Verdict("duplicate", f"same content as {earlier} ({status})")
        return Verdict("process")

    def taken(self, rel: str, fp: str | None, row: dict[str, Any]) -> None:
        """Attach the fingerprint to the entry the pipeline just wrote for ``row``."""
        entry = self.entries.get(rel)
        if fp is None or entry is None or entry[:2] != [row.get("size"), row.get("mtime")]:
            return  # no entry for this version (a stacked file keeps its first one)
        del entry[3:]
        entry.append(fp)
        if entry[2] in FINAL:
            self._by_content.setdefault(fp, rel)

    def changed(self, rel: str, size: int, mtime: float) -> None:
        """A stacked file was rewritten and reported: remember this version as seen.

        The entry keeps its status and fingerprint (the stack holds the old content), with the
        new size and mtime, so a restart does not report the same change again, while touching
        it back to the stacked content is still recognised.
        """
        entry = self.entries.get(rel)
        if entry is not None:
            entry[0], entry[1] = size, mtime
