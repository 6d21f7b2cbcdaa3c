"""One live stack per (target, filter): its reference, its accumulator, its history.

The first accepted sub of a stack is its reference: its stars are what later subs are matched
to, its pixel grid is the stack's grid, and its photometry is what later subs are normalised to: a
scale from the fluxes of the stars both share (haze, dew and airmass dim a sub's stars; see
``photometry``) and an offset that brings its sky to the reference's level (a sky brightening
with the moon or dawn does not raise the stack). Weights are inverse noise variance of the
normalised sub, so a sub twice as noisy counts a quarter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from subwatch.measure.quality import GateHistory
from subwatch.stack.accumulator import AddResult, WeightedAccumulator
from subwatch.stack.photometry import ReferencePhotometry


def safe_name(text: str | None, default: str) -> str:
    """A folder name from a header value: no separators, no surprises."""
    if not text:
        return default
    name = re.sub(r"[^A-Za-z0-9+._-]+", "_", text.strip()).strip("._")
    return name or default


@dataclass
class StackSession:
    target: str
    filter: str
    kappa: float | None
    warmup: int
    base_target: str = ""  # the OBJECT this stack belongs to; target may carry -2, -3 ...
    serial: int = 1  # 1 for the first stack of a target and filter, then 2, 3 ...
    pointing: tuple[float | None, float | None] = (None, None)  # reference RA, Dec (deg)
    accumulator: WeightedAccumulator | None = None
    # (N, 4) x, y, flux, positional sigma; (N, 3) from checkpoints written before sigma
    reference_stars: np.ndarray | None = None
    reference_photometry: ReferencePhotometry | None = None  # stamps to compare fluxes by
    reference_background: float = 0.0
    reference_noise: float = 0.0
    history: GateHistory = field(default_factory=GateHistory)
    files: list[str] = field(default_factory=list)
    exptime_total: float = 0.0
    date_obs: str | None = None
    stacked: int = 0
    rejected: int = 0
    fwhm: list[float] = field(default_factory=list)
    snr: list[float] = field(default_factory=list)
    updated: bool = False

    def __post_init__(self) -> None:
        self.base_target = self.base_target or self.target

    @property
    def key(self) -> tuple[str, str]:
        return (self.target, self.filter)

    @property
    def has_reference(self) -> bool:
        return self.accumulator is not None

    def start(
        self,
        shape: tuple[int, ...],
        stars: np.ndarray,
        background: float,
        noise: float,
        photometry: ReferencePhotometry | None = None,
    ) -> None:
        self.accumulator = WeightedAccumulator(shape, kappa=self.kappa, warmup=self.warmup)
        self.reference_stars = stars
        self.reference_photometry = photometry
        self.reference_background = background
        self.reference_noise = noise

    def add(
        self,
        warped: np.ndarray,
        coverage: np.ndarray,
        *,
        background: float,
        noise: float,
        weighting: str,
        normalize: bool,
        scale: float = 1.0,
    ) -> AddResult:
        """Normalise and integrate a registered sub.

        Normalised, the sub is ``scale * x + (reference background - scale * background)``:
        its stars as bright as the reference's and its sky at the reference's level. Its noise
        scales with it, and the weight (inverse variance) is that of the normalised sub, so a
        hazy sub brought up by 1.3 counts as the noisier frame it is.
        """
        assert self.accumulator is not None
        if not normalize:
            scale = 1.0
        offset = self.reference_background - scale * background if normalize else 0.0
        noise = scale * noise
        weight = 1.0 / (noise * noise) if weighting == "noise" and noise > 0 else 1.0
        result = self.accumulator.add(
            warped,
            coverage,
            weight=weight,
            noise=noise,
            sky=self.reference_background,
            scale=scale,
            offset=offset,
        )
        self.stacked += 1
        self.updated = True
        return result

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The session for a checkpoint: JSON-able fields and arrays."""
        assert self.accumulator is not None
        acc_meta, arrays = self.accumulator.to_state()
        meta = {
            "target": self.target,
            "filter": self.filter,
            "base_target": self.base_target,
            "serial": self.serial,
            "pointing": list(self.pointing),
            "kappa": self.kappa,
            "warmup": self.warmup,
            "reference_background": self.reference_background,
            "reference_noise": self.reference_noise,
            "history": self.history.to_state(),
            "files": self.files,
            "exptime_total": self.exptime_total,
            "date_obs": self.date_obs,
            "stacked": self.stacked,
            "rejected": self.rejected,
            "fwhm": self.fwhm,
            "snr": self.snr,
            "accumulator": acc_meta,
        }
        arrays = dict(arrays)
        arrays["reference_stars"] = np.asarray(self.reference_stars, np.float64)
        if self.reference_photometry is not None:
            arrays.update(self.reference_photometry.to_arrays())
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> StackSession:
        session = cls(
            meta["target"],
            meta["filter"],
            kappa=meta["kappa"],
            warmup=meta["warmup"],
            base_target=meta["base_target"],
            serial=int(meta["serial"]),
            pointing=tuple(meta["pointing"]),
        )
        session.accumulator = WeightedAccumulator.from_state(meta["accumulator"], arrays)
        session.reference_stars = arrays["reference_stars"]
        session.reference_photometry = ReferencePhotometry.from_arrays(arrays)
        session.reference_background = float(meta["reference_background"])
        session.reference_noise = float(meta["reference_noise"])
        session.history = GateHistory.from_state(meta["history"])
        session.files = list(meta["files"])
        session.exptime_total = float(meta["exptime_total"])
        session.date_obs = meta["date_obs"]
        session.stacked = int(meta["stacked"])
        session.rejected = int(meta["rejected"])
        session.fwhm = [float(v) for v in meta["fwhm"]]
        session.snr = [float(v) for v in meta["snr"]]
        return session
