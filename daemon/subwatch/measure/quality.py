"""Quality gates: should this sub go into the stack, and if not, why, in words a user knows.

A gate compares a sub with the *running median* of the subs accepted so far in the same stack,
not with fixed numbers, because what is good depends on the rig and the night: 2.5 px FWHM is
superb on one scope and soft on another. Only accepted subs enter the history, and medians
ignore a single outlier, so one bad frame never moves the bar. Until ``warmup_frames`` subs
have been accepted only absolute gates apply (too few stars, elongation, saturation). Each
rejection carries one reason, the most telling, in words a user knows:

- ``too few stars``: fewer than ``min_stars`` before the night has a history;
- ``trailed``: median eccentricity above ``max_eccentricity`` (guiding failure, wind);
- ``saturated``: more than ``max_saturated_fraction`` of the stars clipped (overexposure);
- ``defocused``: FWHM above ``max_fwhm_ratio`` times the running median (focus, seeing);
- ``clouds``: stars lost (count below ``min_star_ratio``), the brightest stars dimmed (flux
  below ``min_flux_ratio``: haze, thin cloud, dew on the optics), or the sky much brighter
  (background above ``max_background_ratio``: cloud lit from below, dawn, moon).

The star flux compared is the median flux of the 25 brightest unsaturated stars: the same
stars from sub to sub whatever the seeing, so a drop means less light reached the sensor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from subwatch.config import GatesConfig
from subwatch.measure.frame import FrameMeasurement


@dataclass
class GateHistory:
    """Recent accepted subs of one stack; medians over a window follow a slowly changing night."""

    window: int = 25
    fwhm: deque[float] = field(default_factory=lambda: deque(maxlen=25))
    stars: deque[float] = field(default_factory=lambda: deque(maxlen=25))
    background: deque[float] = field(default_factory=lambda: deque(maxlen=25))
    flux: deque[float] = field(default_factory=lambda: deque(maxlen=25))

    def add(self, m: FrameMeasurement) -> None:
        if m.fwhm is not None:
            self.fwhm.append(m.fwhm)
        self.stars.append(float(m.n_stars))
        self.background.append(m.background.level)
        flux = bright_flux(m)
        if flux is not None:
            self.flux.append(flux)

    def __len__(self) -> int:
        return len(self.stars)

    def to_state(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in ("fwhm", "stars", "background", "flux")}

    @classmethod
    def from_state(cls, state: dict[str, list[float]]) -> GateHistory:
        history = cls()
        for name, values in state.items():
            getattr(history, name).extend(float(v) for v in values)
        return history


def bright_flux(m: FrameMeasurement, count: int = 25) -> float | None:
    """Median flux (ADU) of the ``count`` brightest unsaturated stars."""
    stars = m.stars
    unsat = np.flatnonzero(~stars.saturated)
    if unsat.size == 0:
        return None
    brightest = np.sort(stars.flux[unsat])[::-1][:count]
    return float(np.median(brightest))


def _ratio(value: float | None, history: deque[float]) -> float | None:
    """``value`` over the median of ``history``, or None when either is missing."""
    if value is None or not history:
        return None
    median = float(np.median(history))
    return value / median if median > 0 else None


def judge(m: FrameMeasurement, history: GateHistory, cfg: GatesConfig) -> str | None:
    """Reason to reject, or None to accept.

    Elongation is checked before width: a trailed star is also a wide one, but a defocused
    star stays round, so the order keeps the reason true.
    """
    if not cfg.enabled:
        return None
    if m.n_stars < cfg.min_stars:
        return "too few stars" if len(history) < cfg.warmup_frames else "clouds"
    if m.eccentricity is not None and m.eccentricity > cfg.max_eccentricity:
        return "trailed"
    if m.n_stars and m.stars.saturated.sum() > cfg.max_saturated_fraction * m.n_stars:
        return "saturated"
    if len(history) < cfg.warmup_frames:
        return None
    fwhm = _ratio(m.fwhm, history.fwhm)
    if fwhm is not None and fwhm > cfg.max_fwhm_ratio:
        return "defocused"
    stars = _ratio(float(m.n_stars), history.stars)
    flux = _ratio(bright_flux(m), history.flux)
    background = _ratio(m.background.level, history.background)
    if (stars is not None and stars < cfg.min_star_ratio) or (
        flux is not None and flux < cfg.min_flux_ratio
    ):
        return "clouds"
    if background is not None and background > cfg.max_background_ratio:
        return "clouds"
    return None
