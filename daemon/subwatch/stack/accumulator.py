"""A running weighted mean that equals the batch integration of the same frames.

Each registered sub arrives with a coverage map (which stack pixels it really covers) and a
weight (inverse noise variance, so a hazy sub counts less). The accumulator keeps, per pixel, the
float64 sums of w, w x and w x^2; the stack is sum(w x) / sum(w) at any moment, so the live stack
after N subs is exactly the weighted mean of those N subs, without the drift that float32 running
means accumulate over thousands of frames. Pixels a sub does not cover add nothing, so dithered
edges are averaged over the subs that saw them, not over zeros.

The same sums give a per-pixel weighted spread, which streaming kappa-sigma rejection uses:
once ``warmup`` subs are in, a pixel more than ``kappa`` spreads from the running mean (a
satellite trail, a cosmic ray, an aircraft) is left out of the sums and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 128


@dataclass
class AddResult:
    rejected_pixels: int
    covered_pixels: int


class WeightedAccumulator:
    """Per-pixel float64 sums for a weighted mean with coverage and optional rejection."""

    def __init__(
        self, shape: tuple[int, ...], *, kappa: float | None = 3.0, warmup: int = 5
    ) -> None:
        self.shape = tuple(shape)
        self.sum_w = np.zeros(self.shape, np.float64)
        self.sum_wx = np.zeros(self.shape, np.float64)
        self.sum_wxx = np.zeros(self.shape, np.float64)
        self.count = np.zeros(self.shape[:2], np.int32)
        self.kappa = kappa
        self.warmup = warmup
        self.n_frames = 0

    def add(
        self, image: np.ndarray, coverage: np.ndarray, weight: float = 1.0, noise: float = 0.0
    ) -> AddResult:
        """Integrate one registered sub; ``coverage`` is (H, W) in 0..1, 1 = fully covered.

        ``noise`` (the sub's sky noise, ADU) floors the rejection spread: a spread estimated
        from a handful of subs is often far too small by chance, and would reject clean pixels.
        Work is done a block of rows at a time, so the float64 temporaries stay a few MB even
        on a 60 MP sensor.
        """
        if image.shape != self.shape:
            raise ValueError(f"sub shape {image.shape} differs from the stack's {self.shape}")
        judge = self.kappa is not None and self.n_frames >= self.warmup
        rejected = covered_total = 0
        for r0 in range(0, self.shape[0], BLOCK_ROWS):
            rows = slice(r0, r0 + BLOCK_ROWS)
            rej, cov = self._add_block(rows, image[rows], coverage[rows], weight, noise, judge)
            rejected += rej
            covered_total += cov
        self.n_frames += 1
        return AddResult(rejected_pixels=rejected, covered_pixels=covered_total)

    def _add_block(
        self,
        rows: slice,
        image: np.ndarray,
        coverage: np.ndarray,
        weight: float,
        noise: float,
        judge: bool,
    ) -> tuple[int, int]:
        covered = coverage >= 0.999
        use = covered if image.ndim == 2 else np.repeat(covered[:, :, None], image.shape[2], axis=2)
        sum_w, sum_wx, sum_wxx = self.sum_w[rows], self.sum_wx[rows], self.sum_wxx[rows]
        rejected = 0
        if judge:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sum_wx / sum_w
                spread = np.sqrt(np.maximum(sum_wxx / sum_w - mean * mean, noise * noise))
                outlier = np.abs(image - mean) > self.kappa * spread
            # Only pixels that enough earlier subs saw can be judged.
            seen = self.count[rows] >= self.warmup
            outlier &= use & (seen if image.ndim == 2 else seen[:, :, None])
            rejected = int(outlier.any(axis=2).sum() if image.ndim == 3 else outlier.sum())
            use &= ~outlier
        w = use * weight  # float64: the sums stay exact for thousands of subs
        wx = w * image
        sum_w += w
        sum_wx += wx
        wx *= image
        sum_wxx += wx
        self.count[rows] += covered
        return rejected, int(covered.sum())

    def mean(self) -> np.ndarray:
        """The stack as float32; pixels no sub covered are 0 (see ``coverage``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(self.sum_w > 0, self.sum_wx / self.sum_w, 0.0)
        return out.astype(np.float32)

    def coverage(self) -> np.ndarray:
        """How many subs covered each pixel."""
        return self.count.copy()
