"""Quality gates: should this sub go into the stack, and if not, why, in words a user knows.

A gate compares a sub with the *running median* of the subs accepted so far in the same stack,
not with fixed numbers, because what is good depends on the rig and the night: 2.5 px FWHM is
superb on one scope and soft on another. Until ``warmup_frames`` subs have been accepted only
absolute gates apply (too few stars). Each rejection carries one reason, the most telling:
``clouds`` (stars lost, or the sky much brighter), ``trailed`` (elongated stars: guiding or
wind), ``defocused`` (stars much wider), ``too few stars``.
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

    def add(self, m: FrameMeasurement) -> None:
        if m.fwhm is not None:
            self.fwhm.append(m.fwhm)
        self.stars.append(float(m.n_stars))
        self.background.append(m.background.level)

    def __len__(self) -> int:
        return len(self.stars)


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
    if len(history) < cfg.warmup_frames:
        return None
    if history.fwhm and m.fwhm is not None:
        med_fwhm = float(np.median(history.fwhm))
        if m.fwhm > cfg.max_fwhm_ratio * med_fwhm:
            return "defocused"
    med_stars = float(np.median(history.stars))
    if med_stars > 0 and m.n_stars < cfg.min_star_ratio * med_stars:
        return "clouds"
    med_bkg = float(np.median(history.background))
    if med_bkg > 0 and m.background.level > cfg.max_background_ratio * med_bkg:
        return "clouds"
    return None
