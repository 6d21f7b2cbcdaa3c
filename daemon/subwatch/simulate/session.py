"""One night at the telescope, from plan to files on disk.

``Simulation`` holds the fixed parts (camera, star field, nebula, the planned lights) and
renders any frame on demand from its own random stream; ``simulate_session`` writes them in
the order a real night produces them: calibration frames first (dated in the afternoon), then
the lights, optionally at a real-time cadence and streamed into place like a capture program.
"""

from __future__ import annotations

import math
import os
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from astropy.io import fits

from subwatch.frames.outputs import write_fits_atomic, write_json_atomic
from subwatch.simulate import bands, fitswrite, night, sensor, sky

# Flat exposures per filter: a panel is bright, narrowband filters pass little of it.
FLAT_EXPTIME = {
    "L": 1.0,
    "R": 2.0,
    "G": 2.0,
    "B": 2.5,
    "Ha": 8.0,
    "OIII": 8.0,
    "SII": 8.0,
    "OSC": 1.5,
}
OSC_LABEL = "OSC"

# Approximate J2000 positions, so RA/DEC headers look like the target's.
TARGETS = {
    "M42": (83.8221, -5.3911),
    "M31": (10.6847, 41.2692),
    "M33": (23.4621, 30.6599),
    "M45": (56.75, 24.1167),
    "M27": (299.9016, 22.7211),
    "M51": (202.4696, 47.1952),
    "M81": (148.8882, 69.0653),
    "M101": (210.8023, 54.349),
    "M1": (83.6331, 22.0145),
    "M8": (270.9042, -24.3867),
    "M16": (274.7, -13.8067),
    "M20": (270.6208, -22.9717),
    "M57": (283.3963, 33.0292),
    "NGC7000": (314.6833, 44.3167),
    "IC1396": (324.7458, 57.4833),
    "NGC2237": (97.9833, 4.95),
    "IC434": (85.2458, -2.4583),
    "NGC6960": (311.4, 30.7167),
}


@dataclass
class SimOptions:
    """What to simulate. Camera and sky defaults describe a cooled IMX571-class mono CMOS
    at unity-ish gain on a 106 mm f/5 refractor under a suburban sky."""

    out: Path
    lights: int = 8
    width: int = 1024
    height: int = 768
    seed: int = 1
    exptime: float = 60.0
    target: str = "M42"
    filters: tuple[str, ...] = ("L",)
    osc: bool = False
    bayer: str = "RGGB"
    meridian_flip_at: int | None = None  # light index from which the frame is turned 180 deg
    defects: dict[int, list[str]] = field(default_factory=dict)
    calibration: bool = True
    n_bias: int = 5
    n_darks: int = 5
    n_flats: int = 5
    interval: float | None = None  # seconds between lights; None writes everything at once
    temperature: float = -10.0  # sensor set point, C
    filter_order: str = "blocks"  # or "roundrobin"
    # camera
    gain: float = 0.8  # e-/ADU
    read_noise_e: float = 2.5
    bias_adu: float = 500.0
    full_well: float = 50000.0
    dark_e_per_s: float = 0.002  # typical pixel at -10 C; doubles every 6 C
    gain_setting: int = 100  # what GAIN says: the camera's setting, not e-/ADU
    offset_setting: int = 50
    pixel_um: float = 3.76
    focal_mm: float = 530.0
    # sky
    sky_e_per_s: float = 13.0  # sky glow per pixel through L at the frame centre
    nebula_peak: float = 3.0  # brightest nebula / sky glow, through L
    star_density: float = 1500.0  # stars per megapixel of sky
    star_min_e_per_s: float = 4.0  # faintest star, L
    seeing: tuple[float, float] = (2.5, 3.5)  # FWHM range, px
    dither_px: float = 15.0
    max_rotation_deg: float = 0.3
    night_start: str = "2026-11-21T20:00:00"  # UTC, first light's DATE-OBS
    calibration_start: str = "2026-11-21T16:30:00"  # UTC, first bias

    @property
    def pixel_scale(self) -> float:
        """arcsec per pixel."""
        return 206.264806 * self.pixel_um / self.focal_mm


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()) or "target"


def _fmt_exp(exptime: float) -> str:
    return f"{exptime:g}"


class Simulation:
    """The fixed parts of a night and the renderers of every frame in it."""

    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        o = opts
        if o.lights < 1:
            raise ValueError("need at least one light")
        if o.width < 32 or o.height < 32:
            raise ValueError("frames must be at least 32 x 32 pixels")
        if o.exptime <= 0:
            raise ValueError("exposure must be positive")
        if o.meridian_flip_at is not None and not 0 <= o.meridian_flip_at < o.lights:
            raise ValueError(f"meridian flip index {o.meridian_flip_at} is not a light index")
        for index in o.defects:
            if not 0 <= index < o.lights:
                raise ValueError(f"defect on light {index}, but there are {o.lights} lights")
        names = o.filters.split(",") if isinstance(o.filters, str) else list(o.filters)
        self.filters = [bands.canonical_filter(f) for f in names if f.strip()] if not o.osc else []
        if not o.osc and not self.filters:
            raise ValueError("at least one filter is needed")
        self.filters = list(dict.fromkeys(self.filters))
        self.labels_used = self.filters if not o.osc else [OSC_LABEL]
        self.shape = (o.height, o.width)
        self.centre = ((o.width - 1) / 2.0, (o.height - 1) / 2.0)

        self.camera = sensor.make_camera(
            o.seed,
            o.width,
            o.height,
            gain=o.gain,
            read_noise_e=o.read_noise_e,
            bias_adu=o.bias_adu,
            full_well=o.full_well,
            dark_e_per_s=o.dark_e_per_s,
            osc=o.osc,
            bayer=o.bayer,
        )
        # Fill the camera's caches now: frames are later rendered on several threads.
        self.sites = self.camera.sites() if o.osc else None
        for label in self.labels_used:
            self.camera.illumination(label)

        scene_rng = np.random.default_rng([o.seed, 10])
        # The sky must cover every frame: a dither, a small rotation about the centre and a
        # 180-degree flip (which maps the frame onto itself) move a corner by at most this.
        margin = (
            o.dither_px * math.sqrt(2.0)
            + math.hypot(o.width, o.height) / 2.0 * math.sin(math.radians(o.max_rotation_deg))
            + 24.0
        )
        self.sky_bounds = (-margin, -margin, o.width - 1 + margin, o.height - 1 + margin)
        self.stars = sky.make_starfield(
            scene_rng,
            self.sky_bounds,
            o.star_density,
            o.star_min_e_per_s,
            max_rate=8000.0 * o.full_well / o.exptime,
        )
        self.nebula = sky.make_nebula(
            scene_rng, self.sky_bounds, (o.width, o.height), o.nebula_peak * o.sky_e_per_s
        )
        self.sky_tilt = float(scene_rng.uniform(0.08, 0.2))
        self.sky_curvature = float(scene_rng.uniform(0.02, 0.06))

        labels = night.filter_sequence(tuple(self.labels_used), o.lights, o.filter_order)
        self.plans = night.plan_night(
            seed=o.seed,
            n_lights=o.lights,
            width=o.width,
            height=o.height,
            labels=labels,
            osc=o.osc,
            exptime=o.exptime,
            temperature=o.temperature,
            start=datetime.fromisoformat(o.night_start),
            flip_at=o.meridian_flip_at,
            defects=o.defects,
            dither_px=o.dither_px,
            max_rotation_deg=o.max_rotation_deg,
            seeing=o.seeing,
        )
        self.ra, self.dec = self._coordinates(o.target)
        self._cal_rng = np.random.default_rng([o.seed, 70])
        self.calibration_plan = self._plan_calibration() if o.calibration else []

    # ----------------------------------------------------------------- geometry and names
    @staticmethod
    def _coordinates(target: str) -> tuple[float, float]:
        key = re.sub(r"[\s_-]+", "", target.upper())
        if key in TARGETS:
            return TARGETS[key]
        crc = zlib.crc32(key.encode())
        return (crc % 36000) / 100.0, ((crc >> 16) % 12000) / 100.0 - 30.0

    def _plane_responses(self, plan: night.LightPlan) -> list[np.ndarray]:
        """Six-component responses of the planes of a light: the filter, or R, G, B sites."""
        if self.opts.osc:
            return [bands.responses(k, osc=True) for k in range(3)]
        return [bands.responses(plan.label, osc=False)]

    def light_path(self, plan: night.LightPlan) -> str:
        t = _safe(self.opts.target)
        name = f"{t}_{plan.label}_{_fmt_exp(self.opts.exptime)}s_{plan.number:04d}.fits"
        return f"lights/{t}/{plan.label}/{name}"

    # ----------------------------------------------------------------- rendering
    def light_signal(
        self,
        index: int,
        *,
        stars: bool = True,
        nebula: bool = True,
        glow: bool = True,
        transients: bool = True,
    ) -> np.ndarray:
        """(planes, H, W) float32 expected electrons from the sky, before the flat field.

        Planes are the filter (mono) or the R, G, B Bayer sites (colour). ``transients``
        adds a satellite trail when the light has one; cosmic rays are never part of the
        signal (they bypass the optics).
        """
        plan = self.plans[index]
        t = self.opts.exptime
        resp = self._plane_responses(plan)
        h, w = self.shape
        out = np.zeros((len(resp), h, w), dtype=np.float32)
        if stars:
            inv = night.invert_affine(plan.matrix)
            fx, fy = night.apply_affine(inv, self.stars.x, self.stars.y)
            flux = np.stack([self.stars.rates_in(r) for r in resp]) * (t * plan.transparency)
            out += sky.render_stars(self.shape, fx, fy, flux, plan.fwhm, plan.beta)
        if nebula:
            lines = self.nebula.render(plan.matrix, self.shape)
            for p, r in enumerate(resp):
                out[p] += (lines @ r[3:6].astype(np.float32)) * np.float32(t * plan.transparency)
        if plan.trailed is not None and (stars or nebula):
            kernel = sky.line_kernel(*plan.trailed)
            for p in range(len(resp)):
                out[p] = cv2.filter2D(out[p], -1, kernel, borderType=cv2.BORDER_CONSTANT)
        if glow:
            level = self.opts.sky_e_per_s * t * plan.sky_drift * plan.sky_factor
            for p, r in enumerate(resp):
                out[p] += sky.sky_glow(
                    self.shape,
                    level * float(bands.SKY_SPECTRUM @ r),
                    plan.sky_angle_rad,
                    self.sky_tilt,
                    self.sky_curvature,
                )
        if transients:
            for defect in plan.defects:
                if defect["type"] == "trail":
                    line = sky.trail_image(
                        self.shape,
                        (defect["x0"], defect["y0"]),
                        (defect["x1"], defect["y1"]),
                        defect["width"],
                    )
                    for p, r in enumerate(resp):
                        amplitude = defect["peak_e"] * float(bands.NEUTRAL_SPECTRUM @ r)
                        out[p] += line * np.float32(amplitude)
        return out

    def sky_level(self, index: int) -> list[float]:
        """Sky glow at the frame centre, e- per pixel per plane, before the flat field."""
        plan = self.plans[index]
        level = self.opts.sky_e_per_s * self.opts.exptime * plan.sky_drift * plan.sky_factor
        return [level * float(bands.SKY_SPECTRUM @ r) for r in self._plane_responses(plan)]

    def light_expected(self, index: int, **parts: bool) -> np.ndarray:
        """(H, W) expected photo-electrons on the sensor: signal through the CFA and flat."""
        signal = self.light_signal(index, **parts)
        plane = sensor.mosaic(signal, self.sites) if self.opts.osc else signal[0]
        return plane * self.camera.illumination(self.plans[index].label)

    def cosmic_rays(self, index: int) -> np.ndarray | None:
        plan = self.plans[index]
        if not plan.cosmic:
            return None
        h, w = self.shape
        hits = np.zeros(self.shape, dtype=np.float32)
        for x, y, sx, sy, length, energy in plan.cosmic:
            share = np.array([1.0, 0.5, 0.25][:length])
            share /= share.sum()
            for k in range(length):
                px, py = x + k * sx, y + k * sy
                if 0 <= px < w and 0 <= py < h:
                    hits[py, px] += energy * share[k]
        return hits

    def light_frame(self, index: int) -> np.ndarray:
        """The light as the camera records it: uint16 ADU."""
        plan = self.plans[index]
        rng = np.random.default_rng([self.opts.seed, 50, index])
        return self.camera.expose(
            self.light_expected(index),
            self.opts.exptime,
            plan.ccd_temp,
            rng,
            extra_e=self.cosmic_rays(index),
        )

    def flat_expected(self, label: str) -> np.ndarray:
        """Electrons of a flat: about half the full well on the brightest colour."""
        level = 0.5 * self.opts.full_well
        illum = self.camera.illumination(label)
        if not self.opts.osc:
            return level * illum
        site = np.array(
            [float(bands.PANEL_SPECTRUM @ bands.responses(k, osc=True)) for k in range(3)]
        )
        site = site / site.max()
        return level * illum * site[self.sites].astype(np.float32)

    def calibration_frame(self, item: dict[str, Any]) -> np.ndarray:
        kind = item["kind"]
        rng = np.random.default_rng([self.opts.seed, 60, zlib.crc32(item["file"].encode())])
        if kind == "bias":
            return self.camera.expose(None, 0.0, item["ccd_temp"], rng)
        if kind == "dark":
            return self.camera.expose(None, item["exptime"], item["ccd_temp"], rng)
        flicker = float(rng.normal(1.0, 0.005))
        return self.camera.expose(
            self.flat_expected(item["label"]) * np.float32(flicker),
            item["exptime"],
            item["ccd_temp"],
            rng,
        )

    # ----------------------------------------------------------------- plans and truth
    def _plan_calibration(self) -> list[dict[str, Any]]:
        """Bias, then darks, then flats, all in the afternoon before the night."""
        o = self.opts
        clock = datetime.fromisoformat(o.calibration_start)
        items: list[dict[str, Any]] = []

        def add(kind: str, path: str, exptime: float, label: str | None) -> None:
            nonlocal clock
            temp = round(o.temperature + float(self._cal_rng.normal(0.0, 0.1)), 1)
            items.append(
                {
                    "kind": kind,
                    "file": path,
                    "exptime": exptime,
                    "start": clock,
                    "ccd_temp": temp,
                    "label": label,
                }
            )
            clock += timedelta(seconds=exptime + float(self._cal_rng.uniform(1.0, 3.0)))

        for k in range(o.n_bias):
            add("bias", f"calibration/bias/bias_{k + 1:04d}.fits", 0.0, None)
        for k in range(o.n_darks):
            name = f"dark_{_fmt_exp(o.exptime)}s_{k + 1:04d}.fits"
            add("dark", f"calibration/darks/{name}", o.exptime, None)
        for label in self.labels_used:
            clock += timedelta(seconds=15)
            for k in range(o.n_flats):
                path = f"calibration/flats/{label}/flat_{label}_{k + 1:04d}.fits"
                add("flat", path, FLAT_EXPTIME.get(label, 2.0), label)
        return items

    def header_for(
        self,
        kind: str,
        *,
        exptime: float,
        start: datetime,
        ccd_temp: float,
        label: str | None = None,
        plan: night.LightPlan | None = None,
    ) -> fits.Header:
        o = self.opts
        ra = dec = None
        pierside = None
        if plan is not None:
            scale = o.pixel_scale / 3600.0
            dec = self.dec - plan.dy * scale
            ra = (self.ra - plan.dx * scale / max(math.cos(math.radians(self.dec)), 0.05)) % 360
            pierside = "East" if plan.flipped else "West"
        return fitswrite.frame_header(
            kind,
            exptime=exptime,
            start=start,
            ccd_temp=ccd_temp,
            set_temp=o.temperature,
            gain_setting=o.gain_setting,
            offset_setting=o.offset_setting,
            egain=o.gain,
            instrument="ZWO ASI2600MC Pro" if o.osc else "ZWO ASI2600MM Pro",
            pixel_um=o.pixel_um,
            focal_mm=o.focal_mm,
            telescope="106 mm f/5 refractor",
            filter_name=None if o.osc else label,
            target=o.target if plan else None,
            ra_deg=ra,
            dec_deg=dec,
            pierside=pierside,
            bayer=o.bayer.upper() if o.osc else None,
        )

    def star_catalogue(self) -> list[dict[str, Any]]:
        """Stars inside the reference frame, brightest first, as rendered in light 0."""
        plan = self.plans[0]
        w, h = self.opts.width, self.opts.height
        x, y = self.stars.x, self.stars.y
        inside = (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
        scale = self.opts.exptime * plan.transparency
        per_plane = np.stack([self.stars.rates_in(r) for r in self._plane_responses(plan)])
        per_plane = per_plane[:, inside] * scale
        flux = per_plane.sum(axis=0)
        peak = sky.moffat_peak(per_plane.max(axis=0), plan.fwhm, plan.beta)
        order = np.argsort(-flux)
        xs, ys = x[inside], y[inside]
        rows = []
        for k in order:
            row = {
                "x": round(float(xs[k]), 4),
                "y": round(float(ys[k]), 4),
                "flux": round(float(flux[k]), 2),
                "peak": round(float(peak[k]), 2),
            }
            if self.opts.osc:
                row["rgb"] = [round(float(v), 2) for v in per_plane[:, k]]
            rows.append(row)
        return rows

    def truth(self) -> dict[str, Any]:
        o = self.opts
        lights = []
        for plan in self.plans:
            levels = self.sky_level(plan.index)
            entry: dict[str, Any] = {
                "file": self.light_path(plan),
                "filter": plan.filter,
                "date_obs": fitswrite.iso(plan.start),
                "exptime": o.exptime,
                "ccd_temp": plan.ccd_temp,
                "transform": plan.matrix.tolist(),
                "fwhm": plan.fwhm,
                "beta": plan.beta,
                "rotation_deg": plan.rotation_deg,
                "dx": plan.dx,
                "dy": plan.dy,
                "flipped": plan.flipped,
                "transparency": plan.transparency,
                "sky_e": levels[1] if o.osc else levels[0],
                "defects": plan.defects,
                "expected_status": "rejected" if plan.expected_reason else "stacked",
                "expected_reason": plan.expected_reason,
            }
            if o.osc:
                entry["sky_e_rgb"] = levels
            lights.append(entry)
        cal: dict[str, Any] = {"bias": [], "darks": [], "flats": {}, "flat_exptime": {}}
        for item in self.calibration_plan:
            if item["kind"] == "flat":
                cal["flats"].setdefault(item["label"], []).append(item["file"])
                cal["flat_exptime"][item["label"]] = item["exptime"]
            else:
                cal["bias" if item["kind"] == "bias" else "darks"].append(item["file"])
        dark_now = o.dark_e_per_s * 2.0 ** (
            (o.temperature - sensor.DARK_REFERENCE_TEMP) / sensor.DARK_DOUBLING_C
        )
        return {
            "generator": fitswrite.SOFTWARE,
            "seed": o.seed,
            "width": o.width,
            "height": o.height,
            "osc": o.osc,
            "bayer": o.bayer.upper() if o.osc else None,
            "gain": o.gain,
            "gain_setting": o.gain_setting,
            "offset_setting": o.offset_setting,
            "read_noise_e": o.read_noise_e,
            "bias_adu": o.bias_adu,
            "dark_e_per_s": dark_now,
            "dark_doubling_c": sensor.DARK_DOUBLING_C,
            "full_well": o.full_well,
            "exptime": o.exptime,
            "temperature": o.temperature,
            "target": o.target,
            "ra_deg": self.ra,
            "dec_deg": self.dec,
            "filters": list(self.filters),
            "filter_order": o.filter_order,
            "pixel_scale": o.pixel_scale,
            "pixel_um": o.pixel_um,
            "focal_mm": o.focal_mm,
            "sky_e_per_s": o.sky_e_per_s,
            "meridian_flip_at": o.meridian_flip_at,
            "reference": self.light_path(self.plans[0]),
            "truth_sky": "truth_sky.fits",
            "truth_sky_units": "electrons per exposure, before flat field, dark and noise",
            "lights": lights,
            "calibration": cal,
            "hot_pixels": self.camera.hot_pixels.tolist(),
            "stars": self.star_catalogue(),
        }


def _write_truth_sky(path: Path, sim: Simulation) -> None:
    signal = sim.light_signal(0, transients=False)
    data = signal if sim.opts.osc else signal[0]
    header = fits.Header()
    # Not a sub: a watcher pointed at the session must not stack it.
    header["IMAGETYP"] = ("Truth", "simulation truth, not an exposure")
    header["BUNIT"] = ("electron", "Expected e- per exposure of the reference light")
    header["COMMENT"] = "Noiseless sky of the reference light: glow + nebula + stars,"
    header["COMMENT"] = "before flat field, dark current, shot and read noise and clipping."
    header["COMMENT"] = "A calibrated light (flat normalised to median 1) is this / EGAIN."
    if sim.opts.osc:
        header["COMMENT"] = "Planes: R, G, B Bayer-site responses."
    header["SWCREATE"] = fitswrite.SOFTWARE
    write_fits_atomic(path, data, header)


@dataclass
class _Job:
    """One FITS frame to produce: where it goes, when its exposure ended, how to make it."""

    path: Path
    light: int | None  # light index, None for a calibration frame
    end: datetime
    make: Callable[[], bytes]


def _jobs(sim: Simulation, out: Path) -> list[_Job]:
    jobs: list[_Job] = []
    for item in sim.calibration_plan:

        def make(item: dict[str, Any] = item) -> bytes:
            header = sim.header_for(
                item["kind"],
                exptime=item["exptime"],
                start=item["start"],
                ccd_temp=item["ccd_temp"],
                label=item["label"],
            )
            return fitswrite.fits_bytes(sim.calibration_frame(item), header)

        end = item["start"] + timedelta(seconds=item["exptime"])
        jobs.append(_Job(out / item["file"], None, end, make))
    for plan in sim.plans:

        def make_light(plan: night.LightPlan = plan) -> bytes:
            header = sim.header_for(
                "light",
                exptime=sim.opts.exptime,
                start=plan.start,
                ccd_temp=plan.ccd_temp,
                label=plan.label,
                plan=plan,
            )
            return fitswrite.fits_bytes(sim.light_frame(plan.index), header)

        end = plan.start + timedelta(seconds=sim.opts.exptime)
        jobs.append(_Job(out / sim.light_path(plan), plan.index, end, make_light))
    return jobs


def _prepared(jobs: list[_Job], workers: int, window: int = 3) -> Iterator[tuple[_Job, bytes]]:
    """Frames in job order, rendered a few ahead on ``workers`` threads.

    Every frame draws from its own random stream, so the bytes do not depend on which
    thread made them or when; the window bounds how many finished frames wait in memory.
    """
    if workers <= 1:
        for job in jobs:
            yield job, job.make()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque[tuple[_Job, Future[bytes]]] = deque()
        upcoming = iter(jobs)
        for job in upcoming:
            queue.append((job, pool.submit(job.make)))
            if len(queue) >= window:
                break
        while queue:
            job, future = queue.popleft()
            following = next(upcoming, None)
            if following is not None:
                queue.append((following, pool.submit(following.make)))
            yield job, future.result()


def simulate_session(
    opts: SimOptions, on_file: Callable[[Path], None] | None = None
) -> dict[str, Any]:
    """Write a whole simulated night under ``opts.out`` and return its truth.

    ``truth.json`` and ``truth_sky.fits`` come first, complete, so a consumer can read the
    answers before the first light lands. Then calibration frames, then lights in capture
    order. Without ``interval`` every file's mtime is set to the end of its exposure; with
    it, calibration frames are written at once and lights at that cadence, each streamed
    into its final name in pieces, and all keep their real modification times (a live
    watcher must see files as new). ``on_file`` is called with the path of every FITS
    frame once it is complete.
    """
    sim = Simulation(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = sim.truth()
    _write_truth_sky(out / "truth_sky.fits", sim)
    write_json_atomic(out / "truth.json", truth)
    live = opts.interval is not None and opts.interval > 0
    workers = max(1, min(2, os.cpu_count() or 1))

    t0: float | None = None
    for job, payload in _prepared(_jobs(sim, out), workers):
        if live and job.light is not None:
            assert opts.interval is not None
            if t0 is None:
                t0 = time.monotonic()
            wait = t0 + job.light * opts.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            chunks = 4
            pause = min(0.3, 0.2 * opts.interval) / chunks
            fitswrite.write_chunked(job.path, payload, chunks=chunks, pause=pause)
        else:
            fitswrite.write_file(job.path, payload, None if live else fitswrite.epoch(job.end))
        if on_file is not None:
            on_file(job.path)
    return truth
