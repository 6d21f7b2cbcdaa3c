"""How deep a stack is: its SNR, its noise against the sqrt(N) promise, a map, and a forecast.

*SNR* is the number the subs report (``measure.frame``): the median, over the 25 brightest
unsaturated stars, of aperture flux / (sky noise x sqrt(aperture pixels)), measured on the
stack by ``measure_frame`` itself, with one correction to the noise. A stack is a mean of
warped subs, and interpolation mixes each pixel with its neighbours: the per-pixel noise from
second differences (what ``measure_frame`` reads, and right for a raw sub) comes out about 20 %
low on a bicubic-warped stack, while the noise of a sum over an aperture is what it always
was. The mixing factor is measured on the stack's clean sky (``warp_mixing``: the noise of 2x2
block means, times 2, over that of single pixels, where the gradient model found sky); the
stack's noise is the subs' measure times that factor, and each star's SNR is taken with it in
place of the local second-difference noise. A sub's SNR and the stack's are then the same
measure, and the stack's grows as sqrt(N_eff).

*Noise against expectation.* The stack is a weighted mean of subs whose per-pixel noises are
sigma_i (in the stack's units, after photometric scaling); its expected noise is
sqrt(sum w_i^2 sigma_i^2) / sum w_i, which for equal noises is sigma_1 / sqrt(N_eff) with
N_eff = (sum w)^2 / sum w^2. ``noise_ratio`` (measured / expected) near 1 says the stack
integrates as it should; well above 1, something adds noise the subs did not have (a bad
registration smearing, a poor rejection, walking noise).

*SNR map.* Per cell of ``SNR_CELL`` px: the mean signal above the sky background over the
noise of one pixel there, i.e. the SNR of an average pixel of the cell. It shows where faint
nebulosity has come out of the noise (above ~3) and where it has not; the noise of each cell
is its own (second differences, corrected for the warp's mixing), so a bright core's own
shot noise counts.

*Forecast.* The integration still needed to reach ``target_snr``: SNR = k sqrt(t) fitted by
least squares to the history of (integration, SNR) checkpoints and the current value, which
averages out the few percent a 25-star median moves between checkpoints and leans on the
latest (the fit weighs each point's k by its integration time); with no history, sqrt scaling
from the current value.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from subwatch.enhance.gradient import GradientModel, fit_gradient
from subwatch.measure.background import clipped_sigma
from subwatch.measure.frame import FrameMeasurement, bright_star_snr, luminance, measure_frame

__all__ = [
    "SNR_CELL",
    "expected_noise",
    "forecast_seconds",
    "snr_map",
    "stack_snr_report",
    "warp_mixing",
]

#: Cell size of the SNR map, px.
SNR_CELL = 32
#: Second differences sampled for the warp's mixing of noise, and the fewest accepted.
MIXING_SAMPLES = 400_000
MIXING_MIN = 500
#: Rows of each cell whose second differences give the cell's noise.
ROWS_PER_CELL = 8


def expected_noise(sub_noises: list[float], weights: list[float] | None) -> tuple[float, float]:
    """Per-pixel noise of a weighted mean of subs with these noises, and N_eff.

    ``weights`` of another length than ``sub_noises`` (or ``None``) mean equal weights.
    """
    sigma = np.asarray(sub_noises, np.float64)
    if weights is None or len(weights) != sigma.size:
        w = np.ones_like(sigma)  # unknown weights: an unweighted mean
    else:
        w = np.asarray(weights, np.float64)
    ok = np.isfinite(sigma) & (sigma > 0) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return float("nan"), 0.0
    sigma, w = sigma[ok], w[ok]
    n_eff = float(w.sum() ** 2 / np.sum(w * w))
    return float(math.sqrt(np.sum(w * w * sigma * sigma)) / w.sum()), n_eff


def warp_mixing(lum: np.ndarray, gradient: GradientModel) -> float | None:
    """True per-pixel noise over what second differences read, measured on the sky.

    Interpolation mixes neighbouring pixels' noise; second differences of neighbours then
    read low, while the noise of a sum over a few pixels is what it always was. The true
    figure is read on 2x2 blocks (their mean's noise times 2): pixels two blocks apart share
    no input pixel of a bicubic warp, and the block mean keeps the noise power the mixing
    only moved around. Both are read with second differences along rows (a smooth sky
    cancels), only where the gradient model found clean sky (a nebula's texture at the block
    scale would count as noise), on a sample of row pairs. 1.0 for independent pixels, about
    1.2-1.3 for a bicubic-warped stack; ``None`` when the frame shows too little sky.
    """
    h, w = lum.shape
    hb, wb = h // 2, w // 2
    if hb < 4 or wb < 4:
        return None
    step = max(1, hb * wb // MIXING_SAMPLES)
    top = np.arange(0, hb, step) * 2
    a, b = lum[top, : 2 * wb], lum[top + 1, : 2 * wb]
    blocks = 0.25 * (a[:, 0::2] + a[:, 1::2] + b[:, 0::2] + b[:, 1::2])
    ma, mb = gradient.mask[top, : 2 * wb], gradient.mask[top + 1, : 2 * wb]
    sky = ma[:, 0::2] & ma[:, 1::2] & mb[:, 0::2] & mb[:, 1::2]
    use = sky[:, 1:-1] & sky[:, :-2] & sky[:, 2:]
    d_blocks = (blocks[:, 1:-1] - 0.5 * (blocks[:, :-2] + blocks[:, 2:]))[use]
    # Pixels 2 .. 2 wb - 3 are those of blocks 1 .. wb - 2, the blocks ``use`` speaks for.
    n = 2 * wb
    d_pixels = a[:, 2 : n - 2] - 0.5 * (a[:, 1 : n - 3] + a[:, 3 : n - 1])
    d_pixels = d_pixels[np.repeat(use, 2, axis=1)]
    if d_blocks.size < MIXING_MIN or d_pixels.size < MIXING_MIN:
        return None
    true_noise = 2.0 * clipped_sigma(d_blocks)
    read = clipped_sigma(d_pixels)
    if not (math.isfinite(true_noise) and math.isfinite(read)) or read <= 0:
        return None
    return float(true_noise / read)


def forecast_seconds(
    snr: float | None,
    integration_s: float,
    history: list[tuple[float, float]],
    target: float,
) -> tuple[float | None, str | None]:
    """Seconds of integration still needed to reach ``target`` SNR, and how it was found.

    ``history`` holds earlier (integration s, SNR) pairs. Returns ``(None, None)`` when the
    SNR is unknown and ``(0.0, "reached")`` when the target is met.
    """
    if snr is None or not math.isfinite(snr) or snr <= 0 or integration_s <= 0:
        return None, None
    if snr >= target:
        return 0.0, "reached"
    points = [
        (float(t), float(s))
        for t, s in [*history, (integration_s, snr)]
        if t is not None and s is not None and math.isfinite(t) and math.isfinite(s)
        if t > 0 and s > 0
    ]
    times = {t for t, _ in points}
    if len(times) >= 2:
        t = np.array([p[0] for p in points])
        s = np.array([p[1] for p in points])
        k = float(np.sum(s * np.sqrt(t)) / np.sum(t))  # least squares of s = k sqrt(t)
        method = "fit"
    else:
        k = snr / math.sqrt(integration_s)
        method = "sqrt"
    needed = (target / k) ** 2 if k > 0 else float("inf")
    return max(needed - integration_s, 0.0), method


def _cell_noise(lum: np.ndarray, cell: int, ny: int, nx: int) -> np.ndarray:
    """(ny, nx) per-pixel noise from second differences on a few rows of each cell."""
    step = max(1, cell // ROWS_PER_CELL)
    rows = np.asarray(lum[: ny * cell : step, : nx * cell], np.float32)
    per_cell = rows.shape[0] // ny
    d = np.empty(rows.shape, np.float32)
    d[:, 1:-1] = rows[:, 1:-1] - 0.5 * (rows[:, :-2] + rows[:, 2:])
    d[:, 0] = d[:, 1]
    d[:, -1] = d[:, -2]
    blocks = np.abs(d[: ny * per_cell]).reshape(ny, per_cell, nx, cell).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(ny, nx, -1)
    k = blocks.shape[2] // 2
    mad = np.partition(blocks, k, axis=2)[:, :, k]
    # Second differences of independent pixels have variance 1.5 sigma^2, median zero.
    return 1.4826 * mad / math.sqrt(1.5)


def snr_map(
    lum: np.ndarray, background: np.ndarray, *, cell: int = SNR_CELL, mixing: float = 1.0
) -> np.ndarray:
    """(H // cell, W // cell) float32: mean signal above ``background`` over one pixel's noise.

    ``mixing`` is the ratio of the stack's true per-pixel noise to what second differences
    read on it (``warp_mixing``; 1 for unwarped data). Structure as sharp as the pixels (a
    nebula's filaments in a small frame) reads as noise too, so bright, finely structured
    cells come out on the cautious side.
    """
    h, w = lum.shape
    ny, nx = h // cell, w // cell
    if ny < 1 or nx < 1:
        return np.zeros((0, 0), np.float32)
    area = (nx, ny)
    signal = cv2.resize(lum[: ny * cell, : nx * cell], area, interpolation=cv2.INTER_AREA)
    # The sky model is smooth: its value at a cell's centre is its mean over the cell.
    centre = cell // 2
    sky = np.asarray(background[centre : ny * cell : cell, centre : nx * cell : cell], np.float32)
    noise = _cell_noise(lum, cell, ny, nx) * np.float32(mixing)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (signal - sky) / noise
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)


def stack_snr_report(
    stack: np.ndarray,
    *,
    n_frames: int,
    sub_noises: list[float],
    weights: list[float] | None,
    integration_s: float,
    snr_history: list[tuple[float, float]],
    target_snr: float,
    gradient: GradientModel | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """SNR, noise against expectation, forecast (a JSON-ready dict) and the SNR map.

    ``sub_noises`` are the stacked subs' per-pixel noises in the stack's units (after
    photometric scaling), ``weights`` their weights (``None``: equal), ``snr_history`` earlier
    (integration s, SNR) pairs of this stack. ``gradient`` is the stack's sky model from
    ``fit_gradient`` (fitted here when not given): the SNR map's sky, and the clean sky on
    which the warp's mixing of noise is measured. Colour stacks are measured on the mean of
    their channels.
    """
    lum = luminance(np.asarray(stack, np.float32))
    if gradient is None:
        gradient = fit_gradient(lum)
    m = measure_frame(lum)
    measured_mixing = warp_mixing(lum, gradient)
    mixing = measured_mixing if measured_mixing is not None else 1.0
    # Measured as the subs' noise is (the mesh median of second differences), then unmixed.
    noise = m.background.noise * mixing
    snr = _sky_limited_snr(m, lum.shape, noise)
    expected, n_eff = expected_noise(sub_noises, weights)
    ratio = noise / expected if expected > 0 and math.isfinite(expected) else None
    remaining, method = forecast_seconds(snr, integration_s, snr_history, target_snr)
    sky = luminance(np.asarray(gradient.background, np.float32))
    report: dict[str, Any] = {
        "snr": _round(snr, 2),
        "noise": _round(noise, 4),
        "noise_expected": _round(expected, 4),
        "noise_ratio": _round(ratio, 4),
        "n_eff": _round(n_eff, 2),
        "n_frames": int(n_frames),
        "forecast_seconds": None if method in (None, "reached") else _round(remaining, 0),
        "forecast_method": method,
        "target_snr": float(target_snr),
        "noise_mixing": _round(measured_mixing, 3),
        "snr_map_cell_px": SNR_CELL,
    }
    return report, snr_map(lum, sky, mixing=mixing)


def _sky_limited_snr(m: FrameMeasurement, shape: tuple[int, int], noise: float) -> float | None:
    """``measure_frame``'s star SNR with the stack's unmixed sky noise in the denominator.

    Each star's SNR there is flux / (local noise x sqrt(aperture px)), the local noise read by
    second differences from the noise mesh at the star; swapping it for ``noise`` keeps the
    stars, their fluxes and apertures, and the selection of the 25 brightest unsaturated.
    """
    stars = m.stars
    if len(stars) == 0 or not math.isfinite(noise) or noise <= 0:
        return None
    local = m.background.at(stars.x, stars.y, shape, "noise")
    return bright_star_snr(replace(stars, snr=stars.snr * local / noise))


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)
