"""The calibration library: raw calibration frames in, the right masters for each light out.

1. Raw bias, dark, flat and dark-flat frames arrive one by one from the watch folder (``add``)
   or are found at start-up in the calibration folder (``scan``). Each joins the group of
   frames it is interchangeable with: same kind, size, binning, gain, offset and colour layout,
   plus the exposure and sensor temperature for darks and dark-flats (a dark library at -10 C
   and at -20 C are two groups) and the filter for flats.
2. A group becomes a master once it holds ``min_frames`` frames, and only when a light needs
   it: masters are built lazily, and rebuilt only when their group has gained frames since
   (dawn flats arriving during the night), never on every light. Flats are first freed of
   their offset (the dark-flat master of their exposure, else the bias master) and brought to
   a common level, since sky flats brighten by the minute; the master is then normalised.
3. Every master is written as ``master_<group>.fits`` with its provenance in the header
   (IMAGETYP, NCOMBINE, the method, the group's keys and one IMCMBnnn card per source file)
   and is found again at start-up (``scan_masters``): a persisted master serves until its group
   gets raw frames it was not built from, then it is rebuilt.
4. For a light, ``match`` picks: the bias of the same sensor settings; the dark of the same
   exposure within the temperature tolerance, else the nearest exposure scaled by exposure time
   when a bias exists (dark current is linear in time, the bias pedestal is not); the flat of
   the same filter and Bayer pattern. Whatever is missing or refused is said in ``notes``, in
   plain words, never as a crash: a light calibrated with a bias alone is still worth stacking.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from subwatch import __version__
from subwatch.calibration.apply import (
    dark_subtrahend,
    find_dark_defects,
    find_dead_pixels,
    normalise_flat,
)
from subwatch.calibration.combine import (
    AdjustedSource,
    FrameSource,
    frame_level,
    open_source,
    sigma_clipped_mean,
)
from subwatch.config import CalibrationConfig
from subwatch.frames import (
    SUPPORTED_SUFFIXES,
    FrameMeta,
    FrameReadError,
    normalise_header,
    read_frame,
    write_fits_atomic,
)

log = logging.getLogger(__name__)

CALIBRATION_KINDS = ("bias", "dark", "flat", "dark-flat")
THERMAL_KINDS = ("dark", "dark-flat")
KAPPA = 3.0
_IMAGETYP = {
    "bias": "Master Bias",
    "dark": "Master Dark",
    "flat": "Master Flat",
    "dark-flat": "Master Dark Flat",
}
_KIND_OF_IMAGETYP = {v.lower(): k for k, v in _IMAGETYP.items()}
_MAX_SOURCES = 999  # IMCMB001 .. IMCMB999


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class GroupKey:
    """What makes calibration frames interchangeable; ``None`` means not recorded."""

    kind: str
    width: int
    height: int
    binning: int = 1
    gain: float | None = None
    offset: float | None = None
    exptime: float | None = None  # seconds; darks and dark-flats only
    filter: str | None = None  # flats only
    bayer: str | None = None
    temperature: float | None = None  # the group's sensor temperature, C; darks only
    channels: int = 1

    def label(self) -> str:
        """A file-name-safe name, e.g. ``dark_1280x960_bin1_g0_o9_10s_26C``."""
        parts = [self.kind, f"{self.width}x{self.height}", f"bin{self.binning}"]
        if self.channels != 1:
            parts.append(f"{self.channels}ch")
        if self.gain is not None:
            parts.append(f"g{self.gain:g}")
        if self.offset is not None:
            parts.append(f"o{self.offset:g}")
        if self.exptime is not None:
            parts.append(f"{self.exptime:g}s")
        if self.temperature is not None:
            parts.append(f"{self.temperature:g}C")
        if self.filter:
            parts.append("".join(c if c.isalnum() or c in "-." else "_" for c in self.filter))
        if self.bayer:
            parts.append(self.bayer)
        return "_".join(parts)


def key_for(meta: FrameMeta) -> GroupKey:
    """The group a raw calibration frame belongs to (temperature is set by the library)."""
    return GroupKey(
        kind=meta.kind,
        width=meta.width,
        height=meta.height,
        binning=meta.binning,
        gain=_round(meta.gain),
        offset=_round(meta.offset),
        exptime=_round(meta.exptime) if meta.kind in THERMAL_KINDS else None,
        filter=(meta.filter or None) if meta.kind == "flat" else None,
        bayer=meta.bayer if meta.channels == 1 else None,
        channels=meta.channels,
    )


class Master:
    """A master frame: pixels (read from its file on first use), provenance and defects."""

    def __init__(
        self,
        key: GroupKey,
        data: np.ndarray | None,
        n_frames: int,
        temperature: float | None,
        path: Path | None = None,
        *,
        sources: tuple[str, ...] = (),
        floor: str | None = None,
    ) -> None:
        self.key = key
        self._data = data
        self.n_frames = n_frames
        self.temperature = temperature  # median of the frames' sensor temperatures, C
        self.path = path
        self.sources = sources
        self.floor = floor  # flats: what was subtracted before normalising
        # (n, 2) rows/cols to repair: hot and cold pixels of a dark, dead pixels of a flat.
        self.defects: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        """float32 (H, W) or (H, W, C); a persisted master is read on first use."""
        return self.load()

    def load(self) -> np.ndarray:
        """The pixels, read from the master's file if not in memory yet."""
        if self._data is None:
            if self.path is None:
                raise ValueError(f"master {self.key.label()} has neither pixels nor a file")
            self._data = read_frame(self.path).data
        return self._data

    @property
    def loaded(self) -> bool:
        return self._data is not None

    def name(self) -> str:
        """The master's file name (its group label when it could not be written)."""
        return self.path.name if self.path is not None else self.key.label()

    def __repr__(self) -> str:
        return f"Master({self.name()}, n={self.n_frames})"


@dataclass
class Group:
    """Raw frames of one key and the master built from them."""

    key: GroupKey
    frames: dict[Path, FrameMeta] = field(default_factory=dict)
    master: Master | None = None
    built_from: frozenset[Path] = frozenset()
    failed: frozenset[Path] | None = None  # the frame set whose build failed; not retried
    floor_signature: tuple[str, ...] | None = None  # flats: offset masters used in the build

    @property
    def files(self) -> list[Path]:
        return list(self.frames)


@dataclass
class MasterSet:
    """The masters chosen for one light, with a plain account of the choice."""

    bias: Master | None = None
    dark: Master | None = None
    flat: Master | None = None
    dark_scale: float | None = None  # light exposure / dark exposure when the dark is scaled
    notes: list[str] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def names(self) -> dict[str, str | None]:
        """Master file names per kind, as written to frames.jsonl."""

        def name(m: Master | None) -> str | None:
            return m.name() if m is not None else None

        return {"bias": name(self.bias), "dark": name(self.dark), "flat": name(self.flat)}

    def subtrahend(self) -> np.ndarray | None:
        """Bias, dark or ``bias + scale * (dark - bias)``, made once per pair and scale."""
        if self.dark is not None:
            bias = self.bias.data if self.bias is not None and self.dark_scale else None
            key = (id(self.dark.data), id(bias) if bias is not None else None, self.dark_scale)
            hit = self.cache.get(key)
            if hit is None:
                if len(self.cache) >= 4:
                    self.cache.clear()
                value = dark_subtrahend(self.dark.data, bias, self.dark_scale)
                # The masters ride along so their ids cannot be reused while cached.
                hit = self.cache[key] = (value, self.dark.data, bias)
            return hit[0]
        if self.bias is not None:
            return self.bias.data
        return None


# -- reading what a file is, without its pixels ------------------------------------------------


def read_meta(path: Path, *, root: Path | None = None, max_dimension: int = 20000) -> FrameMeta:
    """Normalised metadata of a frame; for FITS from the header alone (no pixels read).

    The header is repaired the way ``read_frame`` repairs it (decimal commas and other
    dialects), quietly: a calibration folder of a few hundred frames must not flood the log.
    """
    path = Path(path)
    if not path.name.lower().endswith((".fits", ".fit", ".fts")):
        return read_frame(path, max_dimension=max_dimension, root=root).meta
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                hdu = next((h for h in hdul if h.header.get("NAXIS", 0) >= 2), None)
                if hdu is None:
                    raise FrameReadError("no image", "no image HDU with two or more axes")
                hdu.verify("silentfix+ignore")
                header = hdu.header.copy()
            naxis = int(header.get("NAXIS", 0))
            shape: tuple[int, ...] = (int(header["NAXIS2"]), int(header["NAXIS1"]))
            if naxis == 3 and int(header.get("NAXIS3", 1)) == 3:
                shape = (*shape, 3)
            return normalise_header(header, path, root=root, shape=shape)
    except FrameReadError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise FrameReadError("unreadable", f"{type(exc).__name__}: {exc}") from exc


# -- the library -------------------------------------------------------------------------------


class CalibrationLibrary:
    """Groups of raw calibration frames and the masters built from them.

    ``masters_dir`` is where masters are written (and found again at start-up, as are those in
    ``cfg.path``); ``max_dimension`` is the frame size limit of ``read_frame``.
    """

    def __init__(
        self, masters_dir: Path, cfg: CalibrationConfig, max_dimension: int = 20000
    ) -> None:
        self.masters_dir = Path(masters_dir)
        self.cfg = cfg
        self.max_dimension = max_dimension
        self.groups: dict[GroupKey, Group] = {}
        self._lock = threading.RLock()
        self._cache: dict[Any, Any] = {}
        self.scan_masters()

    # -- frames in ---------------------------------------------------------------------------

    def _folders(self) -> list[Path]:
        folders = [self.masters_dir]
        if (
            self.cfg.path is not None
            and Path(self.cfg.path).resolve() != self.masters_dir.resolve()
        ):
            folders.append(Path(self.cfg.path))
        return folders

    def _is_master_file(self, path: Path) -> bool:
        return path.name.startswith("master_") and path.parent.resolve() in {
            f.resolve() for f in self._folders()
        }

    def add(self, path: Path, meta: FrameMeta) -> GroupKey | None:
        """File a raw calibration frame in its group; returns the group, None if not one.

        Lights, unknown frames and our own masters are ignored. Nothing is read or built here:
        the group's master is (re)built when a light next needs it.
        """
        path = Path(path).resolve()
        if meta.kind not in CALIBRATION_KINDS or self._is_master_file(path):
            return None
        key = key_for(meta)
        with self._lock:
            key = self._with_temperature(key, meta.temperature)
            group = self.groups.setdefault(key, Group(key))
            group.frames.setdefault(path, meta)
        return key

    def _with_temperature(self, key: GroupKey, temperature: float | None) -> GroupKey:
        """Darks join the group whose temperature is within tolerance, nearest first."""
        if key.kind not in THERMAL_KINDS or temperature is None:
            return key
        near = [
            g.key
            for g in self.groups.values()
            if g.key.temperature is not None
            and dataclasses.replace(g.key, temperature=None) == key
            and abs(g.key.temperature - temperature) <= self.cfg.temperature_tolerance
        ]
        if near:
            return min(near, key=lambda k: abs((k.temperature or 0.0) - temperature))
        return dataclasses.replace(key, temperature=round(float(temperature), 1))

    def scan(self, folder: Path | None = None) -> int:
        """Add every raw calibration frame under ``folder`` (default ``cfg.path``), recursively.

        Only headers are read (pixels wait for the build). Folder names under ``folder`` count
        as hints (``darks/300s/...``). Returns the number of frames added.
        """
        folder = Path(folder) if folder is not None else self.cfg.path
        if folder is None or not Path(folder).is_dir():
            return 0
        folder = Path(folder)
        added = 0
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or not path.name.lower().endswith(SUPPORTED_SUFFIXES):
                continue
            if path.name.startswith((".", "master_")):
                continue
            try:
                meta = read_meta(path, root=folder, max_dimension=self.max_dimension)
            except FrameReadError as exc:
                log.warning("calibration folder: %s skipped: %s", path, exc)
                continue
            if self.add(path, meta) is not None:
                added += 1
        log.info("calibration folder %s: %d raw calibration frames", folder, added)
        return added

    def scan_masters(self) -> int:
        """Index the ``master_*.fits`` already in the masters folder and ``cfg.path``."""
        found = 0
        for folder in self._folders():
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("master_*.fits")):
                try:
                    master = _load_master(path)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("master %s not usable: %s", path, exc)
                    continue
                if master is None:
                    continue
                with self._lock:
                    group = self.groups.setdefault(master.key, Group(master.key))
                    if group.master is None or master.n_frames > group.master.n_frames:
                        group.master = master
                        group.built_from = frozenset(Path(s) for s in master.sources)
                        # A flat built without an offset is rebuilt once a bias turns up.
                        none = master.floor == "none"
                        group.floor_signature = ("none",) if none else None
                found += 1
        if found:
            log.info("%d persisted masters indexed", found)
        return found

    # -- masters -----------------------------------------------------------------------------

    def build_all(self) -> list[Master]:
        """Build every group that can be built (offsets first, then darks, then flats)."""
        order = {"bias": 0, "dark-flat": 1, "dark": 2, "flat": 3}
        with self._lock:
            groups = sorted(self.groups.values(), key=lambda g: order.get(g.key.kind, 9))
            masters = [self._ensure(g) for g in groups]
        return [m for m in masters if m is not None]

    def masters(self) -> list[Master]:
        """The masters built or indexed so far (nothing is built here)."""
        with self._lock:
            return [g.master for g in self.groups.values() if g.master is not None]

    def _stale(self, group: Group) -> bool:
        files = frozenset(group.frames)
        if len(files) < self.cfg.min_frames or group.failed == files:
            return False
        if group.master is None or not files <= group.built_from:
            return True
        if group.key.kind == "flat" and group.floor_signature is not None:
            return self._floor_signature(group) != group.floor_signature
        return False

    def _ensure(self, group: Group) -> Master | None:
        """The group's master, (re)built first if its frames changed since the last build."""
        master = group.master
        if master is not None and not master.loaded:
            try:
                master.load()  # a persisted master is read when first needed
            except (FrameReadError, OSError, ValueError) as exc:
                log.warning("master %s not usable: %s", master.name(), exc)
                group.master, group.built_from = None, frozenset()
        if self._stale(group):
            try:
                self._build(group)
            except (FrameReadError, OSError, ValueError, MemoryError) as exc:
                log.warning("master %s not built: %s", group.key.label(), exc)
                group.failed = frozenset(group.frames)
        return group.master

    def _build(self, group: Group) -> None:
        """Read the group's frames a block of rows at a time and write its master."""
        key = group.key
        sources: list[FrameSource] = []
        used: list[Path] = []
        metas: list[FrameMeta] = []
        want = (key.height, key.width) if key.channels == 1 else (key.height, key.width, 3)
        for path in sorted(group.frames):
            try:
                src = open_source(path, max_dimension=self.max_dimension)
            except (FrameReadError, OSError) as exc:
                log.warning("calibration frame %s skipped: %s", path, exc)
                continue
            if tuple(src.shape) != want:
                log.warning("calibration frame %s skipped: size %s", path, src.shape)
                continue
            sources.append(src)
            used.append(path)
            metas.append(group.frames[path])
        try:
            self._combine(group, sources, used, metas)
        finally:
            for src in sources:
                src.close()

    def _combine(
        self,
        group: Group,
        sources: list[FrameSource],
        used: list[Path],
        metas: list[FrameMeta],
    ) -> None:
        key = group.key
        files = frozenset(group.frames)
        floors: list[str] = []
        if key.kind == "flat":
            sources, used, metas, floors = self._prepare_flats(sources, used, metas)
        if len(sources) < self.cfg.min_frames:
            group.failed = files
            log.warning(
                "master %s not built: %d usable frames of %d needed",
                key.label(),
                len(sources),
                self.cfg.min_frames,
            )
            return
        data = sigma_clipped_mean(sources, KAPPA)
        floor_text = None
        if key.kind == "flat":
            data = normalise_flat(data, cfa=key.bayer is not None)
            floor_text = ", ".join(sorted(set(floors))) or "none"
        temps = [m.temperature for m in metas if m.temperature is not None]
        temp = float(np.median(temps)) if temps else None
        master = Master(
            key,
            data,
            len(sources),
            temp,
            sources=tuple(str(p) for p in used),
            floor=floor_text,
        )
        master.path = self._persist(master, metas)
        group.master = master
        group.built_from = files
        group.failed = None
        if key.kind == "flat":
            group.floor_signature = self._floor_signature(group)
        log.info("master %s built from %d frames", key.label(), len(sources))

    def _prepare_flats(
        self, sources: list[FrameSource], used: list[Path], metas: list[FrameMeta]
    ) -> tuple[list[FrameSource], list[Path], list[FrameMeta], list[str]]:
        """Remove each flat's offset and bring it to level one, so flats of any brightness mix."""
        out: tuple[list[FrameSource], list[Path], list[FrameMeta], list[str]] = ([], [], [], [])
        for src, path, meta in zip(sources, used, metas, strict=True):
            floor = self._flat_floor(meta)
            floor_data = None
            if floor is not None and floor.data.shape == tuple(src.shape):
                floor_data = floor.data
            try:
                level = frame_level(src, floor_data)
            except (FrameReadError, OSError) as exc:
                log.warning("flat %s skipped: %s", path, exc)
                continue
            if not np.isfinite(level) or level <= 0:
                log.warning("flat %s skipped: no signal above its offset", path)
                continue
            out[0].append(AdjustedSource(src, floor_data, 1.0 / level))
            out[1].append(path)
            out[2].append(meta)
            if floor_data is not None and floor is not None:
                out[3].append(floor.name())
        return out

    def _flat_floor(self, meta: FrameMeta) -> Master | None:
        """The dark-flat master of this flat's exposure, else the bias master, else nothing."""
        tol = self.cfg.exposure_tolerance
        for kind in ("dark-flat", "bias"):
            groups = [
                g
                for g in self.groups.values()
                if g.key.kind == kind and _why_not(g.key, meta) is None
            ]
            if kind == "dark-flat":
                groups = [g for g in groups if _same_exposure(g.key.exptime, meta.exptime, tol)]
            for group in sorted(groups, key=lambda g: -len(g.frames)):
                master = self._ensure(group)
                if master is not None:
                    return master
        return None

    def _floor_signature(self, group: Group) -> tuple[str, ...]:
        names = set()
        for meta in group.frames.values():
            floor = self._flat_floor(meta)
            names.add(f"{floor.name()}:{floor.n_frames}" if floor is not None else "none")
        return tuple(sorted(names))

    def _persist(self, master: Master, metas: list[FrameMeta]) -> Path | None:
        key = master.key
        header = fits.Header()
        header["IMAGETYP"] = (_IMAGETYP[key.kind], "master frame")
        header["NCOMBINE"] = (master.n_frames, "raw frames combined")
        header["COMBMETH"] = ("sigma-clipped mean", "per pixel, float32")
        header["CLIPKAPP"] = (KAPPA, "kappa: drop values this many sigma from centre")
        header["CLIPCENT"] = ("median", "clipping centre")
        header["CLIPSIG"] = ("inner order statistics", "robust sigma (Blom), floored")
        if key.kind == "flat":
            header["FLATNORM"] = (
                "median of each CFA colour" if key.bayer else "median",
                "normalised to 1 over the central half",
            )
            header["FLATFLOR"] = (master.floor or "none", "offset removed from each flat")
        if key.exptime is not None:
            header["EXPTIME"] = (key.exptime, "exposure of the group, s")
        if key.gain is not None:
            header["GAIN"] = key.gain
        if key.offset is not None:
            header["OFFSET"] = key.offset
        if key.filter:
            header["FILTER"] = key.filter
        if key.bayer:
            header["BAYERPAT"] = key.bayer
        header["XBINNING"] = key.binning
        header["YBINNING"] = key.binning
        if master.temperature is not None:
            header["CCD-TEMP"] = (round(master.temperature, 2), "median of the frames, C")
        if key.temperature is not None:
            header["TEMPGRP"] = (key.temperature, "temperature of the group, C")
        instruments = sorted({m.instrument for m in metas if m.instrument})
        if len(instruments) == 1:
            header["INSTRUME"] = instruments[0]
        header["DATE"] = (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "built, UTC")
        header["SWCREATE"] = (f"subwatch {__version__}", "software that built the master")
        for i, source in enumerate(master.sources[:_MAX_SOURCES], start=1):
            header[f"IMCMB{i:03d}"] = source
        data = master.data
        if data.ndim == 3:  # FITS cubes are planes-first
            data = np.moveaxis(data, -1, 0)
        path = self.masters_dir / f"master_{key.label()}.fits"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_fits_atomic(path, data, header)
        except OSError as exc:
            log.warning("could not write master %s: %s", path, exc)
            return None
        return path

    # -- choosing masters for a light ----------------------------------------------------------

    def match(self, meta: FrameMeta) -> MasterSet:
        """Choose masters for a light; every missing or refused master gets a note."""
        out = MasterSet(cache=self._cache)
        with self._lock:
            out.bias = self._pick_bias(meta, out)
            out.dark, out.dark_scale = self._pick_dark(meta, out)
            out.flat = self._pick_flat(meta, out)
            if self.cfg.cosmetic:
                for master in (out.dark, out.flat):
                    if master is not None:
                        self._find_defects(master)
        return out

    def _find_defects(self, master: Master) -> None:
        if master.defects is not None:
            return
        cfa = master.key.bayer is not None and master.key.channels == 1
        data = master.data if master.data.ndim == 2 else master.data.mean(axis=2)
        if master.key.kind == "dark":
            master.defects = find_dark_defects(data, self.cfg.hot_sigma, cfa=cfa)
        elif master.key.kind == "flat":
            master.defects = find_dead_pixels(data, cfa=cfa)
        if master.defects is not None and len(master.defects):
            log.info("%s: %d defective pixels", master.name(), len(master.defects))

    def _sorted_candidates(
        self, kind: str, meta: FrameMeta, out: MasterSet, what: str
    ) -> list[Group]:
        """Groups of ``kind`` that fit the light's sensor settings, most frames first.

        When none fits, the note says why the largest group was refused.
        """
        fit: list[Group] = []
        refused: list[tuple[int, str]] = []
        for group in self.groups.values():
            if group.key.kind != kind:
                continue
            reason = _why_not(group.key, meta)
            if reason is None:
                fit.append(group)
            else:
                refused.append((-len(group.frames), reason))
        if not fit:
            if refused:
                out.notes.append(f"{what} master refused: {min(refused)[1]}")
            else:
                out.notes.append(f"no {what} master")
        return sorted(fit, key=lambda g: (-len(g.frames), g.key.label()))

    def _first_built(self, groups: Iterable[Group]) -> Master | None:
        for group in groups:
            master = self._ensure(group)
            if master is not None:
                return master
        return None

    def _not_yet(self, groups: list[Group], what: str, out: MasterSet) -> None:
        most = max(len(g.frames) for g in groups)
        if most < self.cfg.min_frames:
            out.notes.append(f"no {what} master yet ({most} of {self.cfg.min_frames} frames)")
        else:
            out.notes.append(f"no {what} master: its frames could not be combined (see the log)")

    def _pick_bias(self, meta: FrameMeta, out: MasterSet) -> Master | None:
        groups = self._sorted_candidates("bias", meta, out, "bias")
        master = self._first_built(groups)
        if master is None and groups:
            self._not_yet(groups, "bias", out)
        return master

    def _pick_dark(self, meta: FrameMeta, out: MasterSet) -> tuple[Master | None, float | None]:
        """Same exposure first, then the nearest one (scaled); too warm or cold ones skipped.

        Groups are ranked from their metadata before anything is built, so only the dark
        that is used gets built, not the whole dark library.
        """
        groups = self._sorted_candidates("dark", meta, out, "dark")
        if not groups:
            return None, None
        exp = meta.exptime
        tol = self.cfg.exposure_tolerance

        def distance(g: Group) -> float:
            dexp = g.key.exptime
            if dexp is None or exp is None:
                return 0.0 if dexp is None and exp is None else np.inf
            return 0.0 if _same_exposure(dexp, exp, tol) else abs(dexp - exp)

        def dtemp(g: Group) -> float:
            t = _group_temperature(g)
            return (
                abs(t - meta.temperature) if t is not None and meta.temperature is not None else 0.0
            )

        ranked = sorted(groups, key=lambda g: (distance(g), dtemp(g), -len(g.frames)))
        too_far = [g for g in ranked if dtemp(g) > self.cfg.temperature_tolerance]
        usable = [g for g in ranked if g not in too_far]
        master = self._first_built(usable)
        group = next((g for g in usable if g.master is master), None)
        for skipped in too_far:
            if group is None or distance(skipped) < distance(group):
                out.notes.append(
                    f"dark {skipped.key.label()} skipped: sensor at "
                    f"{_group_temperature(skipped):g} C, light at {meta.temperature:g} C"
                )
                break
        if master is None or group is None:
            if usable:
                self._not_yet(usable, "dark", out)
            return None, None
        dexp = group.key.exptime
        if _same_exposure(dexp, exp, tol):
            return master, None
        if exp is None or dexp is None:
            if len({g.key.exptime for g in usable}) == 1:
                out.notes.append(
                    f"exposure unknown ({'light' if exp is None else 'dark'}): "
                    f"dark {master.name()} used unscaled"
                )
                return master, None
            out.notes.append("no dark: exposure unknown and darks of several exposures")
            return None, None
        if not self.cfg.scale_darks:
            out.notes.append(f"no dark of {exp:g}s (nearest {dexp:g}s; scaling darks is off)")
            return None, None
        if out.bias is None:
            out.notes.append(f"no dark of {exp:g}s (nearest {dexp:g}s, no bias to scale it)")
            return None, None
        out.notes.append(f"dark scaled from {dexp:g}s to {exp:g}s")
        return master, exp / dexp

    def _pick_flat(self, meta: FrameMeta, out: MasterSet) -> Master | None:
        groups = self._sorted_candidates("flat", meta, out, "flat")
        if not groups:
            return None
        want = (meta.filter or "").strip().casefold() or None
        same = [g for g in groups if ((g.key.filter or "").casefold() or None) == want]
        chosen, note = same, None
        if not same:
            unfiltered = [g for g in groups if not g.key.filter]
            filters = sorted({g.key.filter for g in groups if g.key.filter})
            if want is not None and unfiltered:
                chosen = unfiltered
                note = f"flat has no filter in its header; used for filter {meta.filter}"
            elif want is None and len(filters) == 1:
                chosen = groups
                note = f"light has no filter in its header; flat of filter {filters[0]} used"
            else:
                what = f"filter {meta.filter}" if want else "a light without filter"
                have = ", ".join(filters) or "none"
                out.notes.append(f"no flat for {what} (flats of {have})")
                return None
        master = self._first_built(chosen)
        if master is None:
            self._not_yet(chosen, "flat", out)
            return None
        if note:
            out.notes.append(note)
        if master.floor == "none":
            out.notes.append("flat not offset-corrected: no bias or dark-flat master for it")
        return master


def _group_temperature(group: Group) -> float | None:
    """Sensor temperature of a group, C: its master's, else its frames' median, else its key."""
    if group.master is not None and group.master.temperature is not None:
        return group.master.temperature
    temps = [m.temperature for m in group.frames.values() if m.temperature is not None]
    return float(np.median(temps)) if temps else group.key.temperature


def _same_exposure(a: float | None, b: float | None, tolerance: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tolerance * max(abs(a), abs(b)) + 1e-9


def _why_not(key: GroupKey, meta: FrameMeta) -> str | None:
    """Why a master of ``key`` cannot calibrate a frame described by ``meta`` (None: it can)."""
    if key.channels != meta.channels:
        return f"{key.channels} channel(s), the light has {meta.channels}"
    if (key.width, key.height) != (meta.width, meta.height):
        return f"size {key.width}x{key.height} differs from the light's {meta.width}x{meta.height}"
    if key.binning != meta.binning:
        return f"binning {key.binning} differs from the light's {meta.binning}"
    gain = _round(meta.gain)
    if key.gain is not None and gain is not None and key.gain != gain:
        return f"gain {key.gain:g} differs from the light's {gain:g}"
    offset = _round(meta.offset)
    if key.offset is not None and offset is not None and key.offset != offset:
        return f"offset {key.offset:g} differs from the light's {offset:g}"
    if key.bayer and meta.bayer and meta.channels == 1 and key.bayer != meta.bayer:
        return f"Bayer pattern {key.bayer} differs from the light's {meta.bayer}"
    return None


def _load_master(path: Path) -> Master | None:
    """A persisted master from its header (pixels are read on first use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = fits.getheader(path)
    kind = _KIND_OF_IMAGETYP.get(str(header.get("IMAGETYP", "")).strip().lower())
    if kind is None:
        return None
    naxis = int(header.get("NAXIS", 0))
    channels = int(header.get("NAXIS3", 1)) if naxis == 3 else 1

    def number(card: str) -> float | None:
        value = header.get(card)
        return None if value is None or isinstance(value, bool) else float(value)

    key = GroupKey(
        kind=kind,
        width=int(header["NAXIS1"]),
        height=int(header["NAXIS2"]),
        binning=int(header.get("XBINNING", 1)),
        gain=_round(number("GAIN")),
        offset=_round(number("OFFSET")),
        exptime=_round(number("EXPTIME")) if kind in THERMAL_KINDS else None,
        filter=(str(header["FILTER"]).strip() or None)
        if kind == "flat" and "FILTER" in header
        else None,
        bayer=str(header["BAYERPAT"]).strip() if "BAYERPAT" in header else None,
        temperature=number("TEMPGRP") if kind in THERMAL_KINDS else None,
        channels=channels,
    )
    sources = tuple(str(header[k]) for k in header if k.startswith("IMCMB"))
    return Master(
        key,
        None,
        int(header.get("NCOMBINE", len(sources))),
        number("CCD-TEMP"),
        path,
        sources=sources,
        floor=str(header["FLATFLOR"]) if "FLATFLOR" in header else None,
    )
