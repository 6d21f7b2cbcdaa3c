"""Sky background and noise, robust to stars, nebulae and hot pixels, in a few full-frame passes.

Binning. A sub is first averaged over 2x2 (and again to 4x4) pixel blocks with
``cv2.resize(INTER_AREA)``: one read of the full frame, after which every sky statistic works
on 4 or 16 times fewer pixels. Binning keeps the sky level exactly (a mean of sky is sky) and
makes stars smaller than a box, so clipping removes them as easily as before.

Level. The binned image is cut into a grid of boxes, about 1/16 of the shorter side each
(at least 32 px): large enough that a star or two cannot dominate a box, small enough to follow
a light-pollution gradient. In each box the values are sigma-clipped (stars and hot pixels fall
out) and the clipped median is kept; the grid is median-filtered over 3x3 boxes so that one box
on a bright star does not make a bump. The grid's nodes sit at the boxes' centres, in full
resolution pixel coordinates, and the map between them is bilinear (for detection) or bicubic
(``Background.full``), extended linearly beyond the outer nodes so a gradient stays a gradient
at the frame's edges. This is the classical mesh estimator, vectorised over boxes.

Noise. The per-pixel noise (ADU, standard deviation of one pixel of sky) comes from second
differences along rows of the full-resolution image, ``d = p[i] - (p[i-1] + p[i+1]) / 2``: a
sky or nebula that varies smoothly over a few pixels cancels in ``d``, while independent pixel
noise gives ``var(d) = 1.5 sigma^2``. So a nebula that fills half the frame does not inflate
the noise the way the scatter of pixel values in a box would. ``d`` is clipped like the level
(stars fall out) and taken on a sample of rows in every box, which gives a noise map (brighter
sky and nebulae are noisier, vignetted corners of a calibrated frame too) whose median is the
frame's noise. Pixels whose noise is correlated with their neighbours' (interpolated colour
frames) read lower by this measure; detection therefore re-measures the noise on its own
binned image rather than trusting that pixels are independent.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.ndimage import median_filter

# Samples per box for the clipped statistics: the clipped median of 500 values of a 4x4-binned
# image is good to 1.5 % of the per-pixel noise, and sorting 500 values per box is cheap.
_SAMPLES_PER_BOX = 512


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A per-thread array kept between calls, for the large temporaries of one measurement.

    A freshly allocated image-sized array costs a page fault per 4 KB the first time it is
    written, which for a 26 MP frame's binned copies is as much as the work done in them.
    The caller owns the contents only until its next call with the same name.
    """
    store: dict[str, np.ndarray] | None = getattr(_SCRATCH, "arrays", None)
    if store is None:
        store = _SCRATCH.arrays = {}
    arr = store.get(name)
    if arr is None or arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        arr = np.empty(shape, dtype)
        store[name] = arr
    return arr


class Pyramid:
    """A 2D image and its block-averaged copies (2x2, 4x4, ...), made once and shared.

    ``level(f)`` is the image averaged over ``f x f`` blocks, float32, with a ragged edge cut
    off; binned pixel ``(i, j)`` covers full-resolution rows ``f*i .. f*i + f - 1``, so its
    centre is at ``f*i + (f - 1) / 2``. Each level is made from the next finer one. With
    ``reuse`` the levels live in per-thread scratch arrays (see ``scratch``), valid until the
    next reusing pyramid is built on the same thread.
    """

    def __init__(self, image: np.ndarray, reuse: bool = False) -> None:
        if image.ndim != 2:
            raise ValueError("Pyramid expects a 2D image")
        self.image = image
        self.reuse = reuse
        self._levels: dict[int, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def level(self, factor: int) -> np.ndarray:
        if factor <= 1:
            if 1 not in self._levels:
                self._levels[1] = np.asarray(self.image, dtype=np.float32)
            return self._levels[1]
        if factor not in self._levels:
            src, step = (self.level(factor // 2), 2) if factor % 2 == 0 else (self.level(1), factor)
            h, w = src.shape
            hb, wb = h // step, w // step
            if hb < 1 or wb < 1:
                raise ValueError(f"image too small to bin by {factor}")
            dst = scratch(f"pyramid{factor}", (hb, wb)) if self.reuse else None
            self._levels[factor] = cv2.resize(
                src[: hb * step, : wb * step], (wb, hb), dst=dst, interpolation=cv2.INTER_AREA
            )
        return self._levels[factor]


@dataclass
class Background:
    """Background model of one image: a coarse mesh of sky levels and noises, and their medians.

    Mesh node ``(i, j)`` lies at full-resolution pixel ``(x0 + j * dx, y0 + i * dy)``.
    """

    level: float  # median of the mesh, ADU
    noise: float  # per-pixel standard deviation of the sky, ADU (median of ``noise_mesh``)
    mesh: np.ndarray  # (ny, nx) clipped medians, ADU
    box: int  # box size of the mesh, full-resolution px
    noise_mesh: np.ndarray | None = None  # (ny, nx) per-pixel noise, ADU
    origin: tuple[float, float] = (0.0, 0.0)  # x0, y0 of node (0, 0), px
    step: tuple[float, float] = (0.0, 0.0)  # dx, dy between nodes, px; 0: boxes tile the frame
    _padded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def _geometry(self, shape: tuple[int, int]) -> tuple[float, float, float, float]:
        ny, nx = self.mesh.shape
        if self.step[0] > 0 and self.step[1] > 0:
            return self.origin[0], self.origin[1], self.step[0], self.step[1]
        h, w = shape  # boxes tiling the whole frame
        return (w / nx - 1) / 2, (h / ny - 1) / 2, w / nx, h / ny

    def _pad(self, which: str) -> np.ndarray:
        """The mesh with two rings of nodes extrapolated linearly (a plane stays a plane)."""
        if which not in self._padded:
            m = self.mesh if which == "level" else self.noise_mesh
            if m is None:
                m = np.full(self.mesh.shape, self.noise, np.float64)
            self._padded[which] = _extrapolate(np.asarray(m, np.float64), 2).astype(np.float32)
        return self._padded[which]

    def grid(
        self,
        shape: tuple[int, int],
        factor: int = 1,
        which: str = "level",
        interpolation: int = cv2.INTER_LINEAR,
        out_shape: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The map sampled on the grid of an image binned by ``factor`` (float32).

        ``shape`` is the full-resolution image's; ``out_shape`` defaults to its binned size.
        """
        h, w = shape
        hb, wb = out_shape if out_shape is not None else (h // factor, w // factor)
        x0, y0, dx, dy = self._geometry(shape)
        src = self._pad(which)
        # Binned pixel j has its centre at full-res f*j + (f-1)/2, i.e. mesh (that - x0)/dx + 2.
        m = np.array(
            [
                [factor / dx, 0.0, ((factor - 1) / 2 - x0) / dx + 2.0],
                [0.0, factor / dy, ((factor - 1) / 2 - y0) / dy + 2.0],
            ],
            np.float64,
        )
        return cv2.warpAffine(
            src,
            m,
            (wb, hb),
            flags=interpolation | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The background map at full resolution (bicubic, as smooth as the sky is)."""
        return self.grid(shape, 1, "level", cv2.INTER_CUBIC)

    def at(
        self, x: np.ndarray, y: np.ndarray, shape: tuple[int, int], which: str = "level"
    ) -> np.ndarray:
        """Bilinear value of the level (or ``which="noise"``) mesh at full-res points."""
        x0, y0, dx, dy = self._geometry(shape)
        src = self._pad(which)
        u = np.clip((np.asarray(x, np.float64) - x0) / dx + 2.0, 0, src.shape[1] - 1)
        v = np.clip((np.asarray(y, np.float64) - y0) / dy + 2.0, 0, src.shape[0] - 1)
        i0 = np.minimum(np.floor(v).astype(np.int64), src.shape[0] - 2)
        j0 = np.minimum(np.floor(u).astype(np.int64), src.shape[1] - 2)
        fv, fu = v - i0, u - j0
        top = src[i0, j0] * (1 - fu) + src[i0, j0 + 1] * fu
        bottom = src[i0 + 1, j0] * (1 - fu) + src[i0 + 1, j0 + 1] * fu
        return top * (1 - fv) + bottom * fv


def _extrapolate(mesh: np.ndarray, rings: int) -> np.ndarray:
    """Pad a mesh by ``rings`` nodes on every side, continuing each edge's slope."""
    out = mesh
    for _ in range(rings):
        if out.shape[1] >= 2:
            left = 2 * out[:, :1] - out[:, 1:2]
            right = 2 * out[:, -1:] - out[:, -2:-1]
        else:
            left = right = out[:, :1]
        out = np.hstack([left, out, right])
        if out.shape[0] >= 2:
            top = 2 * out[:1] - out[1:2]
            bottom = 2 * out[-1:] - out[-2:-1]
        else:
            top = bottom = out[:1]
        out = np.vstack([top, out, bottom])
    return out


def _clipped_stats(
    values: np.ndarray, kappa: float = 3.0, iterations: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sigma-clipped median and sigma of a (n_rows, n_values) array.

    Each row is sorted once; clipping then only moves the bounds of the kept slice, so every
    iteration is one comparison pass instead of another median. Sigma comes from the 15.9th and
    84.1st percentiles of the kept values, which is the MAD's robustness at a fraction of its
    cost. NaN sorts last and is never kept.
    """
    srt = np.sort(values.astype(np.float32, copy=False), axis=1)
    n = srt.shape[0]
    rows = np.arange(n)
    lo = np.zeros(n, np.int64)
    hi = np.maximum(np.isfinite(srt).sum(axis=1).astype(np.int64), 1)
    for _ in range(iterations):
        med, sig = _slice_stats(srt, rows, lo, hi)
        stuck = ~(np.isfinite(med) & np.isfinite(sig))
        lo_v = np.where(stuck, -np.inf, med - kappa * sig)[:, None]
        hi_v = np.where(stuck, np.inf, med + kappa * sig)[:, None]
        # Rows are sorted, so counting values below a bound is its index.
        new_lo = np.minimum(np.count_nonzero(srt < lo_v, axis=1), hi - 1)
        new_hi = np.minimum(np.count_nonzero(srt <= hi_v, axis=1), hi)
        new_hi = np.maximum(new_hi, new_lo + 1)
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
    return _slice_stats(srt, rows, lo, hi)


def _quantile(srt: np.ndarray, rows: np.ndarray, lo: np.ndarray, cnt: np.ndarray, q: float):
    """Linearly interpolated quantile ``q`` of each row's kept slice ``lo .. lo + cnt``."""
    pos = lo + q * (cnt - 1)
    i = np.floor(pos).astype(np.int64)
    j = np.minimum(i + 1, lo + cnt - 1)
    f = (pos - i).astype(np.float32)
    return srt[rows, i] * (1 - f) + srt[rows, j] * f


def _slice_stats(
    srt: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    cnt = np.maximum(hi - lo, 1)
    med = _quantile(srt, rows, lo, cnt, 0.5)
    p16 = _quantile(srt, rows, lo, cnt, 0.158655)
    p84 = _quantile(srt, rows, lo, cnt, 0.841345)
    # A 3-sigma clipped Gaussian keeps 99.7 %: its percentiles move by well under 1 %.
    return med, 0.5 * (p84 - p16)


def clipped_sigma(values: np.ndarray) -> float:
    """Sigma-clipped standard deviation of a 1D sample (via its 16th-84th percentiles)."""
    v = np.asarray(values, np.float32).ravel()
    if v.size == 0:
        return float("nan")
    return float(_clipped_stats(v[None, :])[1][0])


def difference_noise(image: np.ndarray, max_samples: int = 10_000) -> float:
    """Per-pixel noise of an image from clipped second differences along a sample of rows."""
    h, w = image.shape
    if w < 3:
        return float("nan")
    n_rows = int(np.clip(max_samples // max(w - 2, 1), 1, h))
    rows = image[np.linspace(0, h - 1, n_rows).astype(np.int64)].astype(np.float32)
    d = rows[:, 1:-1] - 0.5 * (rows[:, :-2] + rows[:, 2:])
    return clipped_sigma(d) / math.sqrt(1.5)


def default_box(shape: tuple[int, int]) -> int:
    """Mesh box size, px: about 1/16 of the shorter side, at least 32."""
    return int(max(32, min(shape) // 16))


def estimate_background(
    image: np.ndarray, box: int | None = None, *, pyramid: Pyramid | None = None
) -> Background:
    """Mesh background and noise of a 2D image (ADU); see the module doc for the method.

    ``pyramid`` lets a caller share the binned copies with detection.
    """
    if image.ndim != 2:
        raise ValueError("estimate_background expects a 2D image")
    pyr = pyramid if pyramid is not None else Pyramid(image)
    h, w = image.shape
    if box is None:
        box = default_box((h, w))
    box = int(max(4, min(box, h, w)))
    # Bin so that a box is still at least 16 binned pixels across.
    f = 1
    while f < 4 and box // (2 * f) >= 16:
        f *= 2
    binned = pyr.level(f)
    hb, wb = binned.shape
    ny, nx = max(1, round(h / box)), max(1, round(w / box))
    by, bx = max(1, hb // ny), max(1, wb // nx)
    ny, nx = min(ny, hb // by), min(nx, wb // bx)
    oy, ox = (hb - ny * by) // 2, (wb - nx * bx) // 2
    stride = max(1, math.ceil(math.sqrt(by * bx / (1.5 * _SAMPLES_PER_BOX))))
    cut = binned[oy : oy + ny * by, ox : ox + nx * bx].reshape(ny, by, nx, bx)
    blocks = cut[:, ::stride, :, ::stride].transpose(0, 2, 1, 3).reshape(ny * nx, -1)
    med, _ = _clipped_stats(blocks)
    mesh = _fill_and_smooth(med.reshape(ny, nx), lambda: _finite_median(blocks))

    # Noise per box from full-resolution second differences on a sample of each box's rows.
    step_y, step_x = f * by, f * bx
    y_start, x_start = f * oy, max(1, f * ox)
    per_row = min(step_y, max(2, -(-_SAMPLES_PER_BOX // step_x)))
    offs = np.linspace(0, step_y - 1, per_row).astype(np.int64)
    row_idx = np.clip((y_start + np.arange(ny)[:, None] * step_y + offs[None, :]).ravel(), 0, h - 1)
    width = min(nx * step_x, w - 1 - x_start)
    step_x = max(1, width // nx)
    rows = np.asarray(image[row_idx], dtype=np.float32)
    seg = rows[:, x_start - 1 : x_start + nx * step_x + 1]
    d = seg[:, 1:-1] - 0.5 * (seg[:, :-2] + seg[:, 2:])
    col_stride = max(1, (per_row * step_x) // _SAMPLES_PER_BOX)
    d = d.reshape(ny, per_row, nx, step_x)[:, :, :, ::col_stride]
    _, dsig = _clipped_stats(d.transpose(0, 2, 1, 3).reshape(ny * nx, -1))
    noise_mesh = _fill_and_smooth(
        dsig.reshape(ny, nx) / math.sqrt(1.5),
        lambda: float(np.std(d[np.isfinite(d)])) / math.sqrt(1.5) if np.isfinite(d).any() else 0.0,
    )
    noise = float(np.median(noise_mesh))

    # Node (i, j) is the centre of box (i, j), in full-resolution pixel coordinates.
    x0 = f * (ox + (bx - 1) / 2) + (f - 1) / 2
    y0 = f * (oy + (by - 1) / 2) + (f - 1) / 2
    return Background(
        level=float(np.median(mesh)),
        noise=noise,
        mesh=mesh,
        box=int(box),
        noise_mesh=noise_mesh,
        origin=(float(x0), float(y0)),
        step=(float(f * bx), float(f * by)),
    )


def _finite_median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else 0.0


def _fill_and_smooth(mesh: np.ndarray, fallback: Callable[[], float]) -> np.ndarray:
    """Boxes without a finite value take the others' median (or ``fallback()``); 3x3 median."""
    mesh = mesh.astype(np.float64)
    bad = ~np.isfinite(mesh)
    if bad.all():
        value = fallback()
        mesh = np.full(mesh.shape, value if np.isfinite(value) else 0.0)
    elif bad.any():
        mesh[bad] = np.nanmedian(mesh)
    if mesh.shape[0] >= 3 and mesh.shape[1] >= 3:
        mesh = median_filter(mesh, size=3, mode="nearest")
    return mesh


@dataclass
class Gradient:
    """A plane fitted to the background mesh: how much and which way the sky brightens."""

    amplitude: float  # ADU, difference across the frame along the steepest direction
    percent: float  # amplitude as a percentage of the background level
    angle_deg: float  # direction of increasing brightness, degrees from +x towards +y


def measure_gradient(bkg: Background, shape: tuple[int, int]) -> Gradient:
    """Fit a plane to the mesh; its slope times the frame's extent along it is the amplitude."""
    ny, nx = bkg.mesh.shape
    h, w = shape
    if ny * nx < 3:
        return Gradient(0.0, 0.0, 0.0)
    x0, y0, dx, dy = bkg._geometry(shape)
    gx, gy = np.meshgrid(x0 + dx * np.arange(nx), y0 + dy * np.arange(ny))
    a = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
    coef, *_ = np.linalg.lstsq(a, bkg.mesh.ravel().astype(np.float64), rcond=None)
    sx, sy = coef[0], coef[1]
    # Extent of the frame along the gradient direction: the projection of the frame corners.
    norm = float(np.hypot(sx, sy))
    if norm == 0:
        return Gradient(0.0, 0.0, 0.0)
    extent = (abs(sx) * w + abs(sy) * h) / norm
    amplitude = norm * extent
    level = max(abs(bkg.level), 1e-6)
    return Gradient(
        amplitude=float(amplitude),
        percent=float(100.0 * amplitude / level),
        angle_deg=float(np.degrees(np.arctan2(sy, sx)) % 360.0),
    )
