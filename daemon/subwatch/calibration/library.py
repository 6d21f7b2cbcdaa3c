"""The calibration library: raw calibration frames in, matching masters out.

Calibration frames are grouped by what makes them interchangeable: kind, size, binning, gain and
offset, plus exposure for darks and filter for flats. A group becomes a master once it holds
``min_frames`` frames; a master is rebuilt when its group grows (dawn flats arriving during the
night) and written under ``masters/`` with its provenance in the header.

For a light, ``match`` picks: the bias of the same sensor settings; the dark of the same
exposure within tolerance and temperature, else the nearest exposure scaled by exposure when a
bias exists (dark current is linear in time, the bias pedestal is not); the flat of the same
filter. Whatever is missing is said in ``notes``, never a crash: a light calibrated with a bias
alone is still worth stacking.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from subwatch.calibration.apply import find_hot_pixels, normalise_flat
from subwatch.calibration.combine import sigma_clipped_mean
from subwatch.config import CalibrationConfig
from subwatch.frames import FrameMeta, FrameReadError, read_frame, write_fits_atomic

log = logging.getLogger(__name__)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class GroupKey:
    kind: str
    width: int
    height: int
    binning: int
    gain: float | None
    offset: float | None
    exptime: float | None  # darks only
    filter: str | None  # flats only

    def label(self) -> str:
        parts = [self.kind, f"{self.width}x{self.height}", f"bin{self.binning}"]
        if self.gain is not None:
            parts.append(f"g{self.gain:g}")
        if self.offset is not None:
            parts.append(f"o{self.offset:g}")
        if self.exptime is not None:
            parts.append(f"{self.exptime:g}s")
        if self.filter:
            parts.append(self.filter.replace("/", "_").replace(" ", "_"))
        return "_".join(parts)


def key_for(meta: FrameMeta) -> GroupKey:
    return GroupKey(
        kind=meta.kind,
        width=meta.width,
        height=meta.height,
        binning=meta.binning,
        gain=_round(meta.gain),
        offset=_round(meta.offset),
        exptime=_round(meta.exptime) if meta.kind in ("dark", "dark-flat") else None,
        filter=(meta.filter or None) if meta.kind == "flat" else None,
    )


@dataclass
class Master:
    key: GroupKey
    data: np.ndarray
    n_frames: int
    temperature: float | None
    path: Path | None = None
    hot_pixels: np.ndarray | None = None  # (n, 2) rows/cols, darks only


@dataclass
class Group:
    key: GroupKey
    files: list[Path] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    master: Master | None = None
    built_from: int = 0


@dataclass
class MasterSet:
    """The masters chosen for one light, with a plain account of the choice."""

    bias: Master | None = None
    dark: Master | None = None
    flat: Master | None = None
    dark_scale: float | None = None
    notes: list[str] = field(default_factory=list)

    def names(self) -> dict[str, str | None]:
        def name(m: Master | None) -> str | None:
            return (
                m.path.name
                if m is not None and m.path is not None
                else (m.key.label() if m else None)
            )

        return {"bias": name(self.bias), "dark": name(self.dark), "flat": name(self.flat)}


class CalibrationLibrary:
    """Groups of raw calibration frames and the masters built from them."""

    def __init__(
        self, masters_dir: Path, cfg: CalibrationConfig, max_dimension: int = 20000
    ) -> None:
        self.masters_dir = Path(masters_dir)
        self.cfg = cfg
        self.max_dimension = max_dimension
        self.groups: dict[GroupKey, Group] = {}
        self._lock = threading.Lock()

    def add(self, path: Path, meta: FrameMeta) -> GroupKey:
        key = key_for(meta)
        with self._lock:
            group = self.groups.setdefault(key, Group(key))
            if path not in group.files:
                group.files.append(path)
                if meta.temperature is not None:
                    group.temperatures.append(meta.temperature)
        return key

    def _build(self, group: Group, bias: Master | None = None) -> Master | None:
        if len(group.files) < self.cfg.min_frames:
            return None
        if group.master is not None and group.built_from == len(group.files):
            return group.master
        frames = []
        for path in group.files:
            try:
                frames.append(read_frame(path, max_dimension=self.max_dimension).data)
            except FrameReadError as exc:
                log.warning("calibration frame %s skipped: %s", path, exc)
        if len(frames) < self.cfg.min_frames:
            return None
        frames = [f if f.ndim == 2 else f.mean(axis=2) for f in frames]
        data = sigma_clipped_mean(frames)
        hot = None
        if group.key.kind == "flat":
            floor = bias.data if bias is not None and bias.data.shape == data.shape else None
            data = normalise_flat(data - floor if floor is not None else data)
        elif group.key.kind == "dark" and self.cfg.cosmetic:
            current = (
                data - bias.data if bias is not None and bias.data.shape == data.shape else data
            )
            hot = find_hot_pixels(current, self.cfg.hot_sigma)
        temp = float(np.median(group.temperatures)) if group.temperatures else None
        master = Master(group.key, data, len(frames), temp, hot_pixels=hot)
        master.path = self._persist(master, group.files[: len(frames)])
        group.master, group.built_from = master, len(group.files)
        log.info("master %s built from %d frames", group.key.label(), len(frames))
        return master

    def _persist(self, master: Master, files: list[Path]) -> Path | None:
        header = fits.Header()
        header["IMAGETYP"] = f"Master {master.key.kind.capitalize()}"
        header["NCOMBINE"] = (master.n_frames, "frames combined")
        header["COMBMETH"] = ("sigma-clipped mean", "kappa 3 around median/MAD")
        if master.key.exptime is not None:
            header["EXPTIME"] = master.key.exptime
        if master.key.gain is not None:
            header["GAIN"] = master.key.gain
        if master.key.offset is not None:
            header["OFFSET"] = master.key.offset
        if master.key.filter:
            header["FILTER"] = master.key.filter
        if master.temperature is not None:
            header["CCD-TEMP"] = master.temperature
        header["XBINNING"] = master.key.binning
        for f in files[:50]:
            header.add_history(f"from {f.name}")
        path = self.masters_dir / f"master_{master.key.label()}.fits"
        try:
            write_fits_atomic(path, master.data, header)
        except OSError as exc:
            log.warning("could not write master %s: %s", path, exc)
            return None
        return path

    def _candidates(self, kind: str, meta: FrameMeta) -> list[Group]:
        return [
            g
            for g in self.groups.values()
            if g.key.kind == kind
            and g.key.binning == meta.binning
            and (g.key.gain is None or meta.gain is None or g.key.gain == _round(meta.gain))
            and (g.key.offset is None or meta.offset is None or g.key.offset == _round(meta.offset))
        ]

    def _temperature_ok(self, master: Master, meta: FrameMeta) -> bool:
        if master.temperature is None or meta.temperature is None:
            return True
        return abs(master.temperature - meta.temperature) <= self.cfg.temperature_tolerance

    def match(self, meta: FrameMeta) -> MasterSet:
        """Choose masters for a light; a wrong-size master is refused with a note."""
        out = MasterSet()
        with self._lock:
            out.bias = self._pick_first(self._candidates("bias", meta), meta, out, "bias")
            out.dark, out.dark_scale = self._pick_dark(meta, out)
            flats = [
                g
                for g in self._candidates("flat", meta)
                if (g.key.filter or None) == (meta.filter or None)
            ]
            if not flats and meta.filter is None:
                flats = self._candidates("flat", meta)
            out.flat = self._pick_first(flats, meta, out, "flat", bias=out.bias)
        return out

    def _pick_first(
        self,
        groups: list[Group],
        meta: FrameMeta,
        out: MasterSet,
        what: str,
        bias: Master | None = None,
    ) -> Master | None:
        sized = [g for g in groups if (g.key.width, g.key.height) == (meta.width, meta.height)]
        if groups and not sized:
            out.notes.append(f"{what} master refused: size differs from the light")
        for group in sorted(sized, key=lambda g: -len(g.files)):
            master = self._build(group, bias=bias)
            if master is not None:
                return master
        if not sized:
            out.notes.append(f"no {what} master")
        return None

    def _pick_dark(self, meta: FrameMeta, out: MasterSet) -> tuple[Master | None, float | None]:
        groups = self._candidates("dark", meta)
        sized = [g for g in groups if (g.key.width, g.key.height) == (meta.width, meta.height)]
        if groups and not sized:
            out.notes.append("dark master refused: size differs from the light")
        if not sized:
            out.notes.append("no dark master")
            return None, None
        exp = meta.exptime or 0.0

        def distance(g: Group) -> float:
            return abs((g.key.exptime or 0.0) - exp)

        for group in sorted(sized, key=distance):
            master = self._build(group, bias=out.bias)
            if master is None:
                continue
            if not self._temperature_ok(master, meta):
                out.notes.append(f"dark {group.key.label()} skipped: temperature differs")
                continue
            dexp = group.key.exptime or 0.0
            if exp and dexp and abs(dexp - exp) <= self.cfg.exposure_tolerance * exp:
                return master, None
            if self.cfg.scale_darks and out.bias is not None and exp and dexp:
                out.notes.append(f"dark scaled from {dexp:g}s to {exp:g}s")
                return master, exp / dexp
            out.notes.append(f"no dark of {exp:g}s (nearest {dexp:g}s, no bias to scale it)")
            return None, None
        out.notes.append("no usable dark master")
        return None, None
