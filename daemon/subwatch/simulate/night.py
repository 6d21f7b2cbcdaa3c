"""The night as a sequence of decisions: where each frame points, how it is timed, what goes wrong.

Everything is planned before a single pixel is rendered, so the truth file can be written
complete before the first light appears, and every frame draws from its own random stream,
so adding a defect to light 5 changes nothing in light 6.

Geometry. Frame ``i`` maps to the reference (light 0) by a rotation ``phi`` about the frame
centre ``c`` followed by a shift ``d`` (the dither):

    ref = R(phi) @ (p - c) + c + d,   R(phi) = [[cos, -sin], [sin, cos]],

so its 2x3 matrix is ``[R | c - R c + d]``. A meridian flip adds 180 degrees to ``phi``: the
camera turns with the tube while the sky stays put. Light 0 has ``phi = 0, d = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

DEFECT_TYPES = ("trail", "cosmic_rays", "clouds", "trailed", "defocus", "haze")
# Defect type -> the reason a good pipeline should give for rejecting the frame.
REJECTING = {"clouds": "clouds", "trailed": "trailed", "defocus": "defocused"}
_DEFECT_ALIASES = {
    "satellite": "trail",
    "aircraft": "trail",
    "trails": "trail",
    "cosmic": "cosmic_rays",
    "cosmics": "cosmic_rays",
    "cr": "cosmic_rays",
    "cosmic_ray": "cosmic_rays",
    "cosmic-rays": "cosmic_rays",
    "cloud": "clouds",
    "cloudy": "clouds",
    "thin_clouds": "haze",
    "dew": "haze",
    "trailing": "trailed",
    "guiding": "trailed",
    "defocused": "defocus",
    "focus": "defocus",
}


@dataclass
class LightPlan:
    """Everything about one light that is decided before rendering."""

    index: int
    filter: str | None  # None on a colour sensor
    label: str  # filter, or "OSC": used in file and folder names
    number: int  # 1-based counter within the label, as capture programs number files
    matrix: np.ndarray  # 2x3, this frame's pixels -> reference pixels
    rotation_deg: float  # angle of the matrix, flip included, in (-180, 180]
    dx: float
    dy: float
    flipped: bool
    fwhm: float
    beta: float
    transparency: float
    sky_factor: float  # multiplies the nominal sky glow (clouds scatter city light)
    sky_drift: float  # slow change of the sky glow over the night
    sky_angle_rad: float  # direction of the glow's gradient in this frame's pixels
    start: datetime
    ccd_temp: float
    defects: list[dict] = field(default_factory=list)
    trailed: tuple[float, float] | None = None  # (length px, angle deg)
    cosmic: list[tuple[int, int, int, int, int, float]] = field(default_factory=list)

    @property
    def expected_reason(self) -> str | None:
        for defect in self.defects:
            if defect["type"] in REJECTING:
                return REJECTING[defect["type"]]
        return None


def frame_matrix(phi_deg: float, dx: float, dy: float, centre: tuple[float, float]) -> np.ndarray:
    """2x3 matrix taking a frame's pixel coordinates to the reference frame's."""
    phi = math.radians(phi_deg)
    c, s = math.cos(phi), math.sin(phi)
    rot = np.array([[c, -s], [s, c]])
    ctr = np.asarray(centre, dtype=np.float64)
    shift = ctr - rot @ ctr + np.array([dx, dy])
    return np.hstack([rot, shift[:, None]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix, as a 2x3 matrix."""
    lin = np.linalg.inv(matrix[:, :2])
    return np.hstack([lin, (-lin @ matrix[:, 2])[:, None]])


def apply_affine(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (
        matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2],
        matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2],
    )


def parse_defects(text: str | None) -> dict[int, list[str]]:
    """``"3:trail,5:clouds,5:cosmic_rays"`` (or ``5:clouds+cosmic_rays``) -> {3: [..], 5: [..]}."""
    result: dict[int, list[str]] = {}
    if not text:
        return result
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        index_text, sep, kinds = item.partition(":")
        if not sep:
            raise ValueError(f"defect {item!r} is not INDEX:TYPE")
        index = int(index_text)
        for kind in kinds.split("+"):
            name = normalise_defect(kind)
            result.setdefault(index, [])
            if name not in result[index]:
                result[index].append(name)
    return result


def normalise_defect(name: str) -> str:
    key = name.strip().lower()
    key = _DEFECT_ALIASES.get(key, key)
    if key not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {name!r}; known: {', '.join(DEFECT_TYPES)}")
    return key


def sprinkle_defects(n_lights: int, first: int = 2) -> dict[int, list[str]]:
    """One of each defect over lights ``first``.., deterministically, never on light 0.

    Frames that should be rejected (clouds, trailed, defocus) each get a frame of their own
    when there is room; the trail and the cosmic rays go on frames that should be stacked,
    since rejection inside the stack, not frame rejection, is what must deal with them.
    """
    eligible = list(range(max(first, 1), n_lights))
    if not eligible:
        return {}
    order = ["trail", "clouds", "cosmic_rays", "trailed", "defocus"]
    result: dict[int, list[str]] = {}
    if len(eligible) >= len(order):
        span = len(eligible) - 1
        for k, kind in enumerate(order):
            result[eligible[round(k * span / (len(order) - 1))]] = [kind]
        return result
    rejecting = [k for k in order if k in REJECTING]
    keep = [k for k in order if k not in REJECTING]
    n_bad = min(len(rejecting), max(1, len(eligible) - 1))
    bad_frames = eligible[-n_bad:]
    good_frames = eligible[:-n_bad] or bad_frames
    for k, kind in enumerate(rejecting):
        result.setdefault(bad_frames[k % len(bad_frames)], []).append(kind)
    for k, kind in enumerate(keep):
        result.setdefault(good_frames[k % len(good_frames)], []).append(kind)
    return result


def filter_sequence(filters: tuple[str, ...], n: int, order: str) -> list[str]:
    """Filters of lights in capture order: blocks (LLLRRRGG) or round-robin (LRGLRG...)."""
    if order == "roundrobin":
        return [filters[i % len(filters)] for i in range(n)]
    if order != "blocks":
        raise ValueError(f"filter order must be 'blocks' or 'roundrobin', not {order!r}")
    per, extra = divmod(n, len(filters))
    seq: list[str] = []
    for k, name in enumerate(filters):
        seq.extend([name] * (per + (1 if k < extra else 0)))
    return seq


def plan_night(
    *,
    seed: int,
    n_lights: int,
    width: int,
    height: int,
    labels: list[str],
    osc: bool,
    exptime: float,
    temperature: float,
    start: datetime,
    flip_at: int | None,
    defects: dict[int, list[str]],
    dither_px: float,
    max_rotation_deg: float,
    seeing: tuple[float, float],
) -> list[LightPlan]:
    """Decide every light of the night; see the module docstring for the geometry."""
    rng = np.random.default_rng([seed, 20])
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    lo, hi = seeing
    mean_seeing = rng.uniform(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
    beta = rng.uniform(2.8, 4.2)
    sky_angle0 = rng.uniform(0.0, 2.0 * math.pi)
    wander = 0.0
    flipped_ref = flip_at is not None and flip_at <= 0
    clock = 0.0
    counters: dict[str, int] = {}
    plans: list[LightPlan] = []
    for i in range(n_lights):
        if i > 0:
            clock += exptime + rng.uniform(3.0, 6.0)
            if labels[i] != labels[i - 1]:
                clock += 20.0  # filter change and refocus
            if flip_at is not None and i == flip_at:
                clock += 300.0  # slew, flip, re-centre, resume guiding
        hours = clock / 3600.0
        wander = 0.8 * wander + rng.normal(0.0, 0.12)
        fwhm = float(np.clip(mean_seeing + wander, lo, hi))
        dx, dy = rng.uniform(-dither_px, dither_px, 2) if i else (0.0, 0.0)
        small_rot = rng.uniform(-max_rotation_deg, max_rotation_deg) if i else 0.0
        flipped = flip_at is not None and i >= flip_at
        phi = small_rot + (180.0 if flipped != flipped_ref else 0.0)
        matrix = frame_matrix(phi, float(dx), float(dy), centre)
        rotation = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
        transparency = float(np.clip(rng.normal(0.97, 0.015), 0.9, 1.0))
        drift = (1.0 - 0.08 * hours) * (1.0 + rng.normal(0.0, 0.01))
        sky_angle = sky_angle0 + math.radians(15.0 * hours) - math.radians(phi)
        ccd_temp = round(temperature + rng.normal(0.0, 0.1), 1)
        label = labels[i]
        counters[label] = counters.get(label, 0) + 1
        plan = LightPlan(
            index=i,
            filter=None if osc else label,
            label=label,
            number=counters[label],
            matrix=matrix,
            rotation_deg=rotation,
            dx=float(dx),
            dy=float(dy),
            flipped=flipped,
            fwhm=fwhm,
            beta=beta,
            transparency=transparency,
            sky_factor=1.0,
            sky_drift=drift,
            sky_angle_rad=sky_angle,
            start=start + timedelta(seconds=clock),
            ccd_temp=ccd_temp,
        )
        for kind in defects.get(i, []):
            _add_defect(
                plan, normalise_defect(kind), np.random.default_rng([seed, 30, i]), width, height
            )
        plans.append(plan)
    return plans


def _add_defect(plan: LightPlan, kind: str, rng: np.random.Generator, w: int, h: int) -> None:
    """Draw the specifics of one defect and record them on the plan."""
    # Each kind draws from its own stream so the order of kinds does not matter.
    rng = np.random.default_rng([int(rng.integers(1 << 31)), DEFECT_TYPES.index(kind)])
    if kind == "trail":
        angle = rng.uniform(0.0, math.pi)
        px, py = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h)
        (x0, y0), (x1, y1) = _clip_line(px, py, angle, w, h)
        plan.defects.append(
            {
                "type": "trail",
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "width": round(float(rng.uniform(2.0, 3.0)), 3),
                "peak_e": round(float(rng.uniform(1500.0, 6000.0)), 1),
            }
        )
    elif kind == "cosmic_rays":
        n = int(rng.integers(5, 16))
        xs = rng.integers(3, w - 3, n)
        ys = rng.integers(3, h - 3, n)
        steps = [(1, 0), (0, 1), (1, 1), (1, -1)]
        for x, y in zip(xs, ys, strict=True):
            sx, sy = steps[int(rng.integers(0, 4))]
            plan.cosmic.append(
                (
                    int(x),
                    int(y),
                    sx,
                    sy,
                    int(rng.integers(1, 4)),
                    float(rng.uniform(1500.0, 20000.0)),
                )
            )
        plan.defects.append(
            {
                "type": "cosmic_rays",
                "positions": [[int(x), int(y)] for x, y in zip(xs, ys, strict=True)],
            }
        )
    elif kind == "clouds":
        transparency = round(float(rng.uniform(0.25, 0.35)), 3)
        factor = round(float(rng.uniform(1.6, 2.4)), 3)
        plan.transparency *= transparency
        plan.sky_factor *= factor
        plan.defects.append({"type": "clouds", "transparency": transparency, "sky_factor": factor})
    elif kind == "trailed":
        length = round(float(rng.uniform(10.0, 20.0)), 2)
        angle = round(float(rng.uniform(0.0, 180.0)), 2)
        plan.trailed = (length, angle)
        plan.defects.append({"type": "trailed", "length_px": length, "angle_deg": angle})
    elif kind == "haze":
        # Thin high cloud or dew on the objective: stars dimmer, yet well worth stacking.
        transparency = round(float(rng.uniform(0.65, 0.8)), 3)
        factor = round(float(rng.uniform(1.0, 1.15)), 3)
        plan.transparency *= transparency
        plan.sky_factor *= factor
        plan.defects.append({"type": "haze", "transparency": transparency, "sky_factor": factor})
    elif kind == "defocus":
        plan.fwhm *= 3.0
        plan.beta = 2.5  # an out-of-focus star has flatter, broader wings
        plan.defects.append({"type": "defocus", "fwhm": round(plan.fwhm, 4)})


def _clip_line(
    px: float, py: float, angle: float, w: int, h: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """End points, on the frame's border, of the line through (px, py) at ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    lo, hi = -math.inf, math.inf
    for p, d, limit in ((px, c, w - 1), (py, s, h - 1)):
        if abs(d) < 1e-12:
            continue
        a, b = (0 - p) / d, (limit - p) / d
        lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    p0 = (round(px + lo * c, 3), round(py + lo * s, 3))
    p1 = (round(px + hi * c, 3), round(py + hi * s, 3))
    return p0, p1
