"""The per-frame path: load, calibrate, measure, judge, register, integrate, record.

One frame goes through plain functions in order; the state it touches lives in three places:
the calibration library, the stack sessions and the journal (``frames.jsonl``). Every outcome,
good or bad, ends as exactly one journal row with a reason, and nothing here raises for a bad
frame: a bad frame is a row, not a crash.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from subwatch import __version__
from subwatch.calibration import CalibrationLibrary, calibrate_light
from subwatch.config import Config
from subwatch.enhance.previews import (
    PREVIEW_FIELDS,
    PreviewOptions,
    PreviewRequest,
    StackSnapshot,
    history_point,
)
from subwatch.frames import (
    FrameMeta,
    FrameReadError,
    JsonlWriter,
    LoadedFrame,
    read_frame,
    write_fits_atomic,
)
from subwatch.frames.meta import separation_deg
from subwatch.frames.outputs import write_json_atomic
from subwatch.measure import FrameMeasurement, measure_frame
from subwatch.measure.frame import FWHM_GUESS
from subwatch.measure.quality import GateHistory, judge
from subwatch.register import Registration, RegistrationError, find_transform, warp_image
from subwatch.service.allocator import release_freed_memory
from subwatch.service.checkpoint import CheckpointState, save_checkpoint
from subwatch.stack import StackSession, safe_name
from subwatch.stack.photometry import FluxScale, flux_scale, reference_photometry

log = logging.getLogger(__name__)

CALIBRATION_KINDS = ("bias", "dark", "flat", "dark-flat")
FWHM_MEMORY = 5  # recent subs whose median FWHM sets the next sub's matched filter
SNR_HISTORY = 500  # (integration, SNR) points kept per stack for the forecast


class Timer:
    """Stage -> seconds, the ``seconds`` object of a journal row."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 4)
        self.last = now

    def done(self) -> dict[str, float]:
        self.stages["total"] = round(time.perf_counter() - self.t0, 4)
        return self.stages


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


class Pipeline:
    """Processes frames one at a time and keeps the stacks; not thread-safe by design."""

    def __init__(self, cfg: Config, watch_root: Path, output: Path) -> None:
        self.cfg = cfg
        self.root = Path(watch_root)
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        calib_dir = cfg.calibration.path or (self.output / "masters")
        self.library = CalibrationLibrary(
            Path(calib_dir), cfg.calibration, cfg.frames.max_dimension
        )
        # Masters already on disk are indexed by the constructor; raw calibration frames in the
        # configured calibration folder are taken in now (headers only, pixels when needed).
        self.library.scan()
        self.journal = JsonlWriter(self.output / "frames.jsonl")
        self.stacks: dict[tuple[str, str], StackSession] = {}
        self.counts: dict[str, int] = {"stacked": 0, "rejected": 0, "error": 0, "calibration": 0}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # What a restart must know: every file handled (size, mtime, status) and the raw
        # calibration frames seen, with their metadata.
        self.processed: dict[str, list[Any]] = {}
        self.calibration_files: list[dict[str, Any]] = []
        self.checkpoint_generation = 0
        # Per target and filter, the last sub that matched no stack: (stars, file).
        self._unmatched: dict[tuple[str, str], tuple[np.ndarray, str]] = {}
        # Files to process again (a sub that matched nothing until its pointing got a stack).
        self.retry: list[Path] = []
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # Per stack: the normalised sky noise and weight of each sub integrated (the noise the
        # stack should have follows from them), and the last preview's status.json fields.
        # Previews finish on another thread: status.json is written under this lock, always
        # from the latest stack fields and the latest preview fields together.
        self.sub_noise: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.preview_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._stack_fields: dict[tuple[str, str], dict[str, Any]] = {}
        self._status_lock = threading.Lock()

    # -- one frame ---------------------------------------------------------------------------

    def process(
        self, path: Path, size: int | None = None, mtime: float | None = None
    ) -> dict[str, Any]:
        timer = Timer()
        record: dict[str, Any] = self._blank(path, size, mtime)
        earlier = self.processed.get(record["file"])
        if earlier is not None and earlier[2] == "stacked":
            # Already in a stack: a rewritten (or retried) file is reported, never stacked twice.
            record.update(status="error", reason="changed after it was stacked")
            record["seconds"] = timer.done()
            self.record(record)
            return record
        try:
            frame = read_frame(path, max_dimension=self.cfg.frames.max_dimension, root=self.root)
            timer.lap("load")
            self._fill_meta(record, frame)
            if frame.meta.kind in CALIBRATION_KINDS:
                self.library.add(path, frame.meta)
                self.calibration_files.append(
                    {"path": record["file"], "meta": frame.meta.as_dict()}
                )
                record["status"] = "calibration"
            elif frame.meta.kind == "unknown":
                declared = frame.meta.sources["kind"].split("=", 1)[-1]
                record.update(status="error", reason=f"unknown frame type '{declared}'")
            else:
                self._process_light(frame, record, timer)
        except FrameReadError as exc:
            record.update(status="error", reason=exc.reason, detail=exc.detail or None)
            log.warning("%s: %s", record["file"], exc)
        except MemoryError:
            record.update(status="error", reason="out of memory")
            log.error("%s: out of memory", record["file"])
        except Exception as exc:  # a defect of ours must not stop the night
            record.update(
                status="error", reason="internal error", detail=f"{type(exc).__name__}: {exc}"
            )
            log.exception("%s: internal error", record["file"])
        record["seconds"] = timer.done()
        self.record(record)
        return record

    def record(self, record: dict[str, Any]) -> None:
        """Journal a row (also used for files that never reached ``process``)."""
        status = record.get("status") or "error"
        self.counts[status] = self.counts.get(status, 0) + 1
        earlier = self.processed.get(record["file"])
        if earlier is None or earlier[2] != "stacked":
            self.processed[record["file"]] = [record.get("size"), record.get("mtime"), status]
        self.journal.append(record)
        for listener in self.listeners:
            listener(record)

    def error_row(
        self, path: Path, reason: str, size: int | None = None, mtime: float | None = None
    ) -> dict[str, Any]:
        record = self._blank(path, size, mtime)
        record.update(status="error", reason=reason, seconds={"total": 0.0})
        return record

    def _blank(self, path: Path, size: int | None, mtime: float | None) -> dict[str, Any]:
        rel = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        return {
            "file": rel,
            "kind": "unknown",
            "status": None,
            "reason": None,
            "target": None,
            "filter": None,
            "exptime": None,
            "stars": None,
            "fwhm": None,
            "eccentricity": None,
            "background": None,
            "noise": None,
            "snr": None,
            "transform": None,
            "seconds": {},
            "size": size,
            "mtime": mtime,
            "processed": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }

    def _fill_meta(self, record: dict[str, Any], frame: LoadedFrame) -> None:
        meta = frame.meta
        if meta.kind == "unknown" and "kind" not in meta.sources:
            # Nothing in the header or the names says what it is: in a capture folder, a light.
            meta.kind = "light"
            meta.sources["kind"] = "assumed"
        record.update(
            kind=meta.kind,
            target=meta.target,
            filter=meta.filter,
            exptime=meta.exptime,
            date_obs=meta.date_obs,
        )
        from_names = {k: v for k, v in meta.sources.items() if v in ("filename", "assumed")}
        if from_names:
            record["from_filename"] = from_names
        if frame.bad_pixels:
            record["bad_pixels"] = frame.bad_pixels

    def _process_light(self, frame: LoadedFrame, record: dict[str, Any], timer: Timer) -> None:
        meta = frame.meta
        masters = self.library.match(meta)
        raw = frame.data
        bayer = meta.bayer if raw.ndim == 2 else None
        calibrated = calibrate_light(
            raw, masters, exptime=meta.exptime, bayer=bayer, cosmetic=self.cfg.calibration.cosmetic
        )
        record["masters"] = masters.names()
        if masters.notes:
            record["calibration_notes"] = masters.notes
        timer.lap("calibrate")

        base = self._base_key(meta.target, meta.filter, calibrated.ndim == 3)
        session = self._current(base)
        saturation = _saturation_level(raw, calibrated)
        m = measure_frame(calibrated, saturation=saturation, fwhm_guess=_fwhm_guess(session))
        self._fill_measurement(record, m)
        timer.lap("measure")

        jumped = session.has_reference and self._pointing_jumped(session, meta)
        record["target"], record["filter"] = session.target, session.filter
        # After a pointing jump the running medians describe another field: absolute gates only.
        reason = judge(m, GateHistory() if jumped else session.history, self.cfg.gates)
        if reason is not None:
            self._reject(session, record, reason)
            return
        timer.lap("judge")

        stars = m.stars.xyfs()
        reg: Registration | None = None
        if session.has_reference:
            reg, failure = self._register(stars, session.reference_stars)
            if reg is None:
                # No match with the current stack: an earlier stack of this target (back to a
                # mosaic panel), else a new pointing if the last unmatched sub agrees with this.
                reg, session = self._other_stack(stars, base, session)
            if reg is None and jumped:
                session = self._new_session(base, "the pointing moved and no stack matches")
            elif reg is None and self._same_as_last_unmatched(base, stars):
                session = self._new_session(base, "two subs in a row matched no stack")
                # The sub before this one started this pointing too: try it again.
                self.retry.append(self.root / self._unmatched[base][1])
            elif reg is None:
                assert failure is not None
                self._unmatched[base] = (stars, record["file"])
                record.update(inliers=failure.inliers, registration_rms=_round(failure.rms, 4))
                self._reject(session, record, "registration failed", detail=str(failure))
                return
            record["target"], record["filter"] = session.target, session.filter
        self._unmatched.pop(base, None)
        if not session.has_reference:
            session.start(
                calibrated.shape,
                stars,
                m.background.level,
                m.background.noise,
                photometry=reference_photometry(calibrated, m.stars, m.fwhm),
            )
            session.pointing = (meta.ra, meta.dec)
            matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            record.update(inliers=len(stars), registration_rms=0.0, reference=True)
            warped, coverage = calibrated, np.ones(calibrated.shape[:2], bool)
        else:
            assert reg is not None
            matrix = reg.matrix
            record.update(
                inliers=reg.inliers,
                registration_rms=_round(reg.rms, 4),
                registration_rms_bright=_round(reg.bright_rms, 4),
            )
            timer.lap("register")
            h, w = calibrated.shape[:2]
            warped, coverage = warp_image(
                calibrated, matrix, (h, w), self.cfg.stacking.interpolation
            )
            timer.lap("warp")
        if frame.mask is not None:
            # Pixels that were NaN/Inf in the file, and every stack pixel they touch, stay out.
            moved = frame.mask.astype(np.float32)
            if not record.get("reference"):
                moved = warp_image(moved, matrix, coverage.shape, "linear")[0]
            coverage = coverage & ~(moved > 0)
        record["transform"] = [[round(float(v), 6) for v in row] for row in matrix]
        scale = FluxScale(1.0, 0, None)
        if not record.get("reference") and session.reference_photometry is not None:
            scale = flux_scale(warped, coverage, session.reference_photometry, m.fwhm)
            record.update(flux_scale=_round(scale.scale, 4), flux_scale_stars=scale.pairs)
        added = session.add(
            warped,
            coverage,
            background=m.background.level,
            noise=m.background.noise,
            weighting=self.cfg.stacking.weighting,
            normalize=self.cfg.stacking.normalize,
            scale=scale.scale,
        )
        record["rejected_pixels"] = added.rejected_pixels
        self._note_sub_noise(session.key, m.background.noise, scale.scale)
        session.files.append(record["file"])
        if added.warmup_rejected:
            # The warm-up buffer was integrated with this sub: its memory is free for good now.
            release_freed_memory()
            # Say what each buffered sub lost.
            buffered = session.files[-len(added.warmup_rejected) :]
            record["warmup_rejected_pixels"] = dict(
                zip(buffered, added.warmup_rejected, strict=True)
            )
        session.history.add(m)
        session.exptime_total += float(meta.exptime or 0.0)
        session.date_obs = session.date_obs or meta.date_obs
        if m.fwhm is not None:
            session.fwhm.append(m.fwhm)
        if m.snr is not None:
            session.snr.append(m.snr)
        record["status"] = "stacked"
        timer.lap("integrate")
        self._since_checkpoint += 1

    def _reject(
        self, session: StackSession, record: dict[str, Any], reason: str, detail: str | None = None
    ) -> None:
        session.rejected += 1
        record.update(status="rejected", reason=reason)
        if detail:
            record["detail"] = detail
        log.info("%s rejected: %s", record["file"], reason)

    def _fill_measurement(self, record: dict[str, Any], m: FrameMeasurement) -> None:
        record.update(
            stars=m.n_stars,
            fwhm=_round(m.fwhm),
            eccentricity=_round(m.eccentricity),
            background=_round(m.background.level, 2),
            noise=_round(m.background.noise, 3),
            snr=_round(m.snr, 2),
            gradient=_round(m.gradient.percent, 3),
            gradient_angle=_round(m.gradient.angle_deg, 1),
        )

    def _base_key(self, target: str | None, filt: str | None, color: bool) -> tuple[str, str]:
        return (safe_name(target, "unknown"), safe_name(filt, "OSC" if color else "nofilter"))

    def _current(self, base: tuple[str, str]) -> StackSession:
        """The stack this target and filter feed now: the latest started, or a new one."""
        sessions = [s for s in self.stacks.values() if (s.base_target, s.filter) == base]
        if sessions:
            return max(sessions, key=lambda s: s.serial)
        return self._new_session(base, None)

    def _new_session(self, base: tuple[str, str], why: str | None) -> StackSession:
        """A new stack for ``base``: the first is named after the target, later ones -2, -3."""
        serial = 1 + max(
            (s.serial for s in self.stacks.values() if (s.base_target, s.filter) == base), default=0
        )
        target = base[0] if serial == 1 else f"{base[0]}-{serial}"
        kappa = self.cfg.stacking.kappa if self.cfg.stacking.rejection == "kappa-sigma" else None
        session = StackSession(
            target,
            base[1],
            kappa=kappa,
            warmup=self.cfg.stacking.rejection_warmup,
            base_target=base[0],
            serial=serial,
        )
        self.stacks[(target, base[1])] = session
        if why:
            log.info("new stack %s/%s: %s", target, base[1], why)
        return session

    def _register(
        self, stars: np.ndarray, reference: np.ndarray
    ) -> tuple[Registration | None, RegistrationError | None]:
        """Match ``stars`` to ``reference`` with the configured model and checks."""
        try:
            reg = find_transform(
                stars,
                reference,
                model=self.cfg.stacking.transform,
                min_inliers=self.cfg.stacking.min_inliers,
                max_rms=self.cfg.stacking.max_registration_rms,
            )
        except RegistrationError as exc:
            return None, exc
        return reg, None

    def _other_stack(
        self, stars: np.ndarray, base: tuple[str, str], current: StackSession
    ) -> tuple[Registration | None, StackSession]:
        others = [
            s
            for s in self.stacks.values()
            if (s.base_target, s.filter) == base and s is not current and s.has_reference
        ]
        for other in sorted(others, key=lambda s: -s.serial):
            reg, _ = self._register(stars, other.reference_stars)
            if reg is not None:
                return reg, other
        return None, current

    def _pointing_jumped(self, session: StackSession, meta: FrameMeta) -> bool:
        """The header's pointing is far from the stack reference's (when both are known)."""
        ra0, dec0 = session.pointing
        if None in (ra0, dec0, meta.ra, meta.dec):
            return False
        moved = separation_deg(ra0, dec0, meta.ra, meta.dec)  # type: ignore[arg-type]
        return moved > self.cfg.stacking.new_stack_jump_deg

    def _same_as_last_unmatched(self, base: tuple[str, str], stars: np.ndarray) -> bool:
        """Two subs in a row that match no stack but each other: the mount went elsewhere."""
        last = self._unmatched.get(base)
        return last is not None and self._register(stars, last[0])[0] is not None

    # -- products ----------------------------------------------------------------------------

    def write_stacks(self) -> list[Path]:
        """Write every stack that changed since the last write, atomically."""
        written = []
        for session in self.stacks.values():
            if session.updated and session.accumulator is not None:
                written.append(self._write_stack(session))
                session.updated = False
        return written

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_due(self) -> bool:
        """Every ``checkpoint_frames`` stacked subs, or ``checkpoint_seconds`` with new work."""
        if self._since_checkpoint == 0:
            return False
        elapsed = time.monotonic() - self._last_checkpoint
        return (
            self._since_checkpoint >= self.cfg.stacking.checkpoint_frames
            or elapsed >= self.cfg.stacking.checkpoint_seconds
        )

    def finish(self) -> None:
        """End of a run: masters for calibration frames no light needed yet (dawn flats), and
        a last checkpoint."""
        try:
            self.library.build_all()
        except Exception:  # a master that cannot be built must not cost the night's stacks
            log.exception("building the remaining masters failed")
        self.checkpoint()

    def checkpoint(self) -> None:
        """Write the stacks, then a checkpoint that matches them and the journal."""
        self.write_stacks()
        state = CheckpointState(
            journal_offset=self.journal.size(),
            processed=self.processed,
            calibration=self.calibration_files,
            counts=self.counts,
            stacks=[s.to_state() for s in self.stacks.values() if s.has_reference],
            generation=self.checkpoint_generation,
        )
        save_checkpoint(self.output, state)
        self.checkpoint_generation = state.generation
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def restore(self, state: CheckpointState) -> None:
        """Continue from a checkpoint: stacks, counters, the files handled, the library."""
        self.processed = {k: list(v) for k, v in state.processed.items()}
        self.counts.update(state.counts)
        self.checkpoint_generation = state.generation
        for meta, arrays in state.stacks:
            session = StackSession.from_state(meta, arrays)
            self.stacks[session.key] = session
        self.calibration_files = list(state.calibration)
        for item in self.calibration_files:
            self.library.add(self.root / item["path"], FrameMeta(**item["meta"]))
        self._restore_preview_state()

    def _restore_preview_state(self) -> None:
        """After a restart: each sub's noise from the journal (already cut back to the
        checkpoint), and the last preview's fields from each stack's status.json."""
        for row in self.journal.read():
            key = (row.get("target"), row.get("filter"))
            if row.get("status") != "stacked" or key not in self.stacks:
                continue
            if row.get("noise") is not None:
                self._note_sub_noise(key, float(row["noise"]), float(row.get("flux_scale") or 1.0))
        for key in self.stacks:
            try:
                doc = json.loads((self.output / key[0] / key[1] / "status.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("preview"), dict):
                self.preview_status[key] = {k: doc[k] for k in PREVIEW_FIELDS if k in doc}

    def _note_sub_noise(self, key: tuple[str, str], noise: float, scale: float) -> None:
        """The sub's noise after normalisation and its weight, as ``StackSession.add`` has
        them (inverse variance with noise weighting)."""
        stacking = self.cfg.stacking
        sigma = (scale if stacking.normalize else 1.0) * noise
        weight = 1.0 / (sigma * sigma) if stacking.weighting == "noise" and sigma > 0 else 1.0
        self.sub_noise.setdefault(key, []).append((round(sigma, 4), weight))

    # -- previews ----------------------------------------------------------------------------

    def preview_request(self, session: StackSession) -> PreviewRequest:
        """A preview of ``session`` as it is now, safe to hand to another thread or process.

        The image is the snapshot's own copy (``mean`` returns a new array), NaN where no sub
        covered the stack (dither edges): the per-frame thread goes on changing the stack.
        """
        acc = session.accumulator
        assert acc is not None
        if acc.buffer:  # still in the warm-up buffer: its plain weighted mean
            image = acc.mean()
            image[acc.count == 0] = np.nan
        else:  # one pass, the mean where any weight fell (0.05 s at 26 MP)
            image = np.where(acc.W > 0, acc.M, np.float32(np.nan))
        noises = self.sub_noise.get(session.key, [])
        history = self.preview_status.get(session.key, {}).get("snr_history", [])
        snapshot = StackSnapshot(
            image,
            target=session.target,
            filter=session.filter,
            n_frames=session.stacked,
            integration_s=session.exptime_total,
            sub_noises=[n for n, _ in noises],
            weights=[w for _, w in noises],
            snr_history=[(float(t), float(v)) for t, v in history],
            stars=session.reference_stars,
        )
        folder = self.output / session.target / session.filter
        return PreviewRequest(snapshot, folder, PreviewOptions.from_config(self.cfg))

    def merge_preview(self, key: tuple[str, str], status: dict[str, Any]) -> dict[str, Any]:
        """Take a finished preview's fields into the stack's status.json (thread-safe); returns
        the whole document."""
        with self._status_lock:
            history = list(self.preview_status.get(key, {}).get("snr_history", []))
            point = history_point(status)
            if point is not None:
                history = [*history, list(point)][-SNR_HISTORY:]
            fields = {k: v for k, v in status.items() if k in PREVIEW_FIELDS}
            fields["snr_history"] = history
            self.preview_status[key] = fields
            return self._write_status(key)

    def _write_status(self, key: tuple[str, str]) -> dict[str, Any]:
        """Write status.json from the latest stack and preview fields; hold the lock."""
        base = self._stack_fields.get(key) or {"target": key[0], "filter": key[1]}
        doc = {**base, **self.preview_status.get(key, {})}
        write_json_atomic(self.output / key[0] / key[1] / "status.json", doc)
        return doc

    def _write_stack(self, session: StackSession) -> Path:
        assert session.accumulator is not None
        folder = self.output / session.target / session.filter
        data = session.accumulator.mean()
        if data.ndim == 3:
            data = np.moveaxis(data, -1, 0)  # FITS cubes are (planes, rows, cols)
        header = fits.Header()
        header["NCOMBINE"] = (session.stacked, "subs integrated")
        header["EXPTIME"] = (round(session.exptime_total, 3), "total integration, s")
        header["OBJECT"] = session.base_target
        if session.target != session.base_target:
            header["STACK"] = (session.target, "a further pointing of this object")
        header["FILTER"] = session.filter
        if session.date_obs:
            header["DATE-OBS"] = (session.date_obs, "start of the first sub")
        header["BUNIT"] = "ADU"
        header["STACKMTH"] = ("weighted mean", self.cfg.stacking.weighting + " weights")
        header["REJECT"] = self.cfg.stacking.rejection
        header["SWCREATE"] = f"subwatch {__version__}"
        if data.ndim == 3:
            header["CTYPE3"] = "RGB"
        path = folder / "stack.fits"
        write_fits_atomic(path, data, header)
        self.stack_status(session)
        with self._status_lock:
            self._write_status(session.key)
        return path

    def stack_status(self, session: StackSession) -> dict[str, Any]:
        """The stack's status.json document: its own fields, and its last preview's."""
        fields = self._stack_fields_of(session)
        with self._status_lock:
            self._stack_fields[session.key] = fields
            return {**fields, **self.preview_status.get(session.key, {})}

    def _stack_fields_of(self, session: StackSession) -> dict[str, Any]:
        return {
            "target": session.target,
            "filter": session.filter,
            "frames_stacked": session.stacked,
            "frames_rejected": session.rejected,
            "integration_seconds": round(session.exptime_total, 3),
            "fwhm_median": _round(float(np.median(session.fwhm)) if session.fwhm else None),
            "sub_snr_median": _round(float(np.median(session.snr)) if session.snr else None, 2),
            "reference_background": _round(session.reference_background, 2),
            "reference_noise": _round(session.reference_noise, 3),
            "updated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }


def _fwhm_guess(session: StackSession) -> float:
    """The star size the next sub's detection filters for: the median FWHM of the stack's
    recent subs, never below the default.

    Stars much wider than the filter make detection run twice (``measure_frame``): with
    4-6 px seeing every sub paid for two passes (measurement at 5.4-5.6 px: 0.14 against
    0.22 s at 9 MP, 0.26 against 0.35 s at 26 MP, medians). A guess wider than the stars
    changes little (simulated 2.6 px stars found with a 3, 4, 5 or 6 px filter: FWHM
    2.602-2.605 px, counts within 3 %), so after a refocus the stack's history may lag
    without harm. The history is part of the checkpoint, so a resumed night filters every
    sub as an uninterrupted one does.
    """
    recent = session.fwhm[-FWHM_MEMORY:]
    return max(FWHM_GUESS, float(np.median(recent))) if recent else FWHM_GUESS


def _saturation_level(raw: np.ndarray, calibrated: np.ndarray) -> float | None:
    """The calibrated level at which star cores clipped, or None if nothing clipped.

    Clipping shows as a plateau: several pixels sharing exactly the highest raw value (the ADC
    ceiling, whatever the camera's bit depth), or values near the 16-bit ceiling. Comparisons
    stay in the raw integer type (a float threshold would convert the whole frame): 5 ms at
    26 MP instead of 50-90.
    """
    top = raw.max()
    if float(top) < 60000 and np.count_nonzero(raw == top) < 3:
        return None
    if np.issubdtype(raw.dtype, np.integer):
        near = raw >= raw.dtype.type(np.ceil(0.995 * float(top)))
    else:
        near = raw >= 0.995 * top
    idx = np.flatnonzero(near)
    values = calibrated.reshape(-1, *calibrated.shape[2:])[idx]
    lum = values if values.ndim == 1 else values.mean(axis=1)
    return float(np.percentile(lum, 5)) * 0.98
