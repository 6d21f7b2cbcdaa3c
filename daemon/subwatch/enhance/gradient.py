"""The sky's gradient across a stack, modelled as a smooth surface under the stars and nebulae.

Light pollution, moonlight and airglow add a sky that brightens towards the horizon; scattered
light and imperfect flats add a bowl or a tilt. In a stack these are a few percent to tens of
percent of the sky level, smooth across the frame, and they are what a stretched preview shows
first. The model has to follow them without eating the faint wings of a nebula: a surface
fitted to every pixel (or a mesh of local medians, as photutils' ``Background2D`` is) rises
under the nebula and subtracts it.

The method, in the order it runs:

1. *A working copy.* The stack is averaged over f x f blocks (f a power of two, so that the
   longer side stays at least 512 px). A gradient varies over hundreds of pixels, so nothing
   is lost, and every later pass touches 1/f^2 of the pixels: at 26 MP, f = 8.
2. *Sample boxes.* The working copy is cut into a grid of boxes, ``grid`` along the longer
   side. Stars are masked pixel by pixel where the 3x3 mean of the excess over the local sky
   (the boxes' medians, interpolated) stands 5 sigma above that mean's noise (sigma: the
   per-pixel noise from second differences, as ``measure.background`` reads it; a star lights
   several neighbours, a noise spike does not), grown by a star's wings. Each box's sample is
   the median of its unmasked pixels.
3. *Sky boxes, by one-sided clipping with a shrinking tolerance.* A polynomial (order 1-4) is
   fitted to the boxes by least squares; boxes more than the tolerance *above* it are left
   out and it is refitted, until the set of boxes is stable; then the tolerance shrinks (by
   0.8 a round) and the fit goes on, down to 1.5 times the error of a box's median (the pixel
   noise over the root of its pixel count) or 0.1 % of the sky level, whichever is more.
   One-sided, because a nebula only ever adds light: boxes *below* the surface are sky that
   pulls it down. Shrinking, because the first fit sits too high under the nebula and too low
   elsewhere; cutting at the noise at once would drop the sky wherever that first surface
   passes under it, and the surface would sink for good. A box median's error is tiny (a
   20 x 20 px box of a stack with 12 ADU noise: about 1 ADU, 0.1 % of the sky), so nebula
   wings a few tenths of a percent above the sky are recognised and left out. With too few
   sky boxes for the order (fewer than twice its terms, and four), the order is lowered.
4. *Surface.* ``polynomial``: that fit, evaluated separably at full resolution (a matrix
   product of a few powers of y and x: exact, 0.1 s at 26 MP). ``rbf``: the same sky boxes, and
   a smoothed thin-plate spline through what the polynomial leaves, which bends the surface
   where sky samples ask for it and relaxes to the polynomial across a masked nebula;
   evaluated on a coarse grid and upsampled bicubically.

Measured (``benchmarks/bench_gradient.py``, ``tests/test_gradient.py``) on simulated scenes
whose glow is known: where the frame shows sky around a nebula, the residual after subtraction
varies by 0.1-0.3 % of the sky level across the frame and 99 % of the nebula's flux remains
(``Background2D``: 19-48 % and 42-73 %). Where the nebula is brighter than 1 % of the sky over
~90 % of the frame, few boxes see only sky and no selection of them can pin the surface down to
1 %: 1.4-3.9 % residual, 92-98 % of the nebula kept.

``remove_gradient`` subtracts the model (keeping the sky's median level as a pedestal, so a
stretch still finds a sky to set its black point on) or divides by it normalised to its median
(for residual vignetting, which multiplies the image rather than adding to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.interpolate import RBFInterpolator

from subwatch.enhance.stretch import as_planes
from subwatch.measure.background import Background, measure_gradient

__all__ = ["METHODS", "GradientModel", "fit_gradient", "remove_gradient"]

METHODS = ("polynomial", "rbf")
#: The working copy is binned until its longer side would fall below this (px).
WORK_SIZE = 512
#: Stars: 3x3 means this many of their noise sigmas above the local sky are masked.
STAR_SIGMA = 5.0
#: Boxes more than this many sigmas above the surface are not sky.
BOX_SIGMA = 1.5
#: ... or by more than this share of the sky level, whichever is more (deep stacks).
SKY_FLOOR = 0.001
#: A box is a sample only when at least this share of its pixels is unmasked.
MIN_SKY_SHARE = 0.3
MAX_ITERATIONS = 20
#: The clipping tolerance shrinks by this factor a round, down to the noise.
SHRINK = 0.8
#: Thin-plate spline smoothing, for samples in units of their noise and coordinates in -1..1.
RBF_SMOOTHING = 0.3
#: Nodes of the coarse grid a spline is evaluated on before bicubic upsampling.
RBF_NODES = 64


@dataclass
class GradientModel:
    """A fitted sky background.

    ``background`` is the model, float32, the image's shape ((H, W) or (H, W, C)), ADU.
    ``mask`` (H, W) is True where pixels were sky samples the surface was fitted to.
    ``amplitude_percent`` is the model's max - min over the frame, percent of its median
    (the luminance for colour), ``angle_deg`` the direction in which it brightens (degrees
    from +x towards +y, as ``measure.Gradient``).
    """

    background: np.ndarray
    mask: np.ndarray
    amplitude_percent: float
    angle_deg: float
    method: str
    order: int = 2  # polynomial order actually fitted (lowered when too few sky boxes remain)
    level: float = 0.0  # median of the model (luminance), ADU: the sky pedestal
    samples: int = 0  # sky boxes the surface was fitted to
    boxes: int = 0  # boxes in the grid


# ----------------------------------------------------------------------------- surfaces


@dataclass
class _Frame:
    """Normalised coordinates: u = (x - cx) / half, v = (y - cy) / half, |u|, |v| <= 1."""

    width: int
    height: int

    @property
    def half(self) -> float:
        return max(self.width, self.height) / 2.0

    def u(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - (self.width - 1) / 2.0) / self.half

    def v(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, np.float64) - (self.height - 1) / 2.0) / self.half


def _terms(order: int) -> list[tuple[int, int]]:
    """Powers (i, j) of u^i v^j with i + j <= order."""
    return [(i, n - i) for n in range(order + 1) for i in range(n, -1, -1)]


class _Polynomial:
    """A polynomial surface per channel: sum of c_ij u^i v^j over i + j <= order."""

    def __init__(self, frame: _Frame, order: int) -> None:
        self.frame = frame
        self.order = order
        self.coef = np.zeros((len(_terms(order)), 1))  # (n_terms, C)

    def _design(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = self.frame.u(x), self.frame.v(y)
        return np.column_stack([u**i * v**j for i, j in _terms(self.order)])

    def fit(self, x: np.ndarray, y: np.ndarray, values: np.ndarray) -> _Polynomial:
        """Least squares through ``values`` (n, C) at full-resolution points ``x``, ``y``."""
        self.coef, *_ = np.linalg.lstsq(self._design(x, y), values, rcond=None)
        return self

    def at_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, C) values at scattered points."""
        return self._design(x, y) @ self.coef

    def on_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """(len(ys), len(xs), C) float32 on the grid of columns ``xs`` and rows ``ys``.

        Separable: per channel, (powers of v) @ C @ (powers of u)^T, one matrix product with
        an inner dimension of order + 1, so a 26 MP evaluation costs one write of the result.
        """
        powers_u = np.stack([self.frame.u(xs) ** i for i in range(self.order + 1)], axis=1)
        powers_v = np.stack([self.frame.v(ys) ** j for j in range(self.order + 1)], axis=1)
        channels = self.coef.shape[1]
        out = np.empty((len(ys), len(xs), channels), np.float32)
        for c in range(channels):
            mixed = np.zeros((self.order + 1, self.order + 1))  # [j, i]: coefficient of u^i v^j
            for (i, j), value in zip(_terms(self.order), self.coef[:, c], strict=True):
                mixed[j, i] = value
            left = (powers_v @ mixed).astype(np.float32)
            plane = left @ powers_u.T.astype(np.float32)
            if channels == 1:
                return plane[:, :, None]
            out[:, :, c] = plane
        return out


class _Spline:
    """A polynomial plus a smoothed thin-plate spline through what the polynomial misses.

    The spline only bends the polynomial where sky samples ask for it (a second light dome, a
    corner of scattered light); across a masked nebula, far from samples, it relaxes to the
    polynomial instead of swinging freely as a spline of the raw samples would.
    """

    def __init__(self, base: _Polynomial) -> None:
        self.base = base
        self.frame = base.frame
        self.order = base.order
        self.rbf: RBFInterpolator | None = None
        self.scale = 1.0

    def fit(self, x: np.ndarray, y: np.ndarray, values: np.ndarray, noise: float) -> _Spline:
        """``noise`` is one sample's error (ADU): the smoothing is set in those units."""
        self.scale = max(noise, 1e-12)
        rest = (values - self.base.at_points(x, y)) / self.scale
        self.rbf = RBFInterpolator(
            np.column_stack([self.frame.u(x), self.frame.v(y)]),
            rest,
            kernel="thin_plate_spline",
            smoothing=RBF_SMOOTHING,
            degree=1,
        )
        return self

    def _bend(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        assert self.rbf is not None
        return self.rbf(np.column_stack([self.frame.u(x), self.frame.v(y)])) * self.scale

    def at_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.base.at_points(x, y) + self._bend(x, y)

    def on_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """As ``_Polynomial.on_grid``; the spline part on a coarse grid, upsampled bicubically."""
        out = self.base.on_grid(xs, ys)
        nx, ny = len(xs), len(ys)
        kx, ky = min(nx, RBF_NODES), min(ny, RBF_NODES)
        gx, gy = np.meshgrid(np.linspace(xs[0], xs[-1], kx), np.linspace(ys[0], ys[-1], ky))
        nodes = self._bend(gx.ravel(), gy.ravel()).reshape(ky, kx, -1).astype(np.float32)
        # Output pixel (col, row) samples node ((kx - 1) col / (nx - 1), ...): corners on corners.
        m = np.array([[(kx - 1) / max(nx - 1, 1), 0.0, 0.0], [0.0, (ky - 1) / max(ny - 1, 1), 0.0]])
        for c in range(nodes.shape[2]):
            out[:, :, c] += cv2.warpAffine(
                np.ascontiguousarray(nodes[:, :, c]),
                m,
                (nx, ny),
                flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )
        return out


_Surface = _Polynomial | _Spline


# ----------------------------------------------------------------------------- samples


def _binning(height: int, width: int) -> int:
    f = 1
    while max(height, width) // (2 * f) >= WORK_SIZE:
        f *= 2
    return f


def _bin(planes: np.ndarray, f: int) -> np.ndarray:
    """(H // f, W // f, C) block means; a block holding NaN is NaN."""
    if f == 1:
        return planes
    h, w, c = planes.shape
    hb, wb = h // f, w // f
    binned = [
        cv2.resize(planes[: hb * f, : wb * f, k], (wb, hb), interpolation=cv2.INTER_AREA)
        for k in range(c)
    ]
    return np.stack(binned, axis=2)


@dataclass
class _Boxes:
    """The sample grid on the working copy: ``ny`` x ``nx`` boxes of ``size`` px."""

    size: int
    ny: int
    nx: int

    @classmethod
    def for_shape(cls, hb: int, wb: int, grid: int) -> _Boxes:
        size = max(4, math.ceil(max(hb, wb) / max(grid, 1)))
        return cls(size, max(1, math.ceil(hb / size)), max(1, math.ceil(wb / size)))

    def blocks(self, arr: np.ndarray) -> np.ndarray:
        """(ny * nx, size * size) pixels of each box of a 2D array; padding is NaN."""
        s = self.size
        pad = np.full((self.ny * s, self.nx * s), np.nan, np.float32)
        pad[: arr.shape[0], : arr.shape[1]] = arr
        return (
            pad.reshape(self.ny, s, self.nx, s).transpose(0, 2, 1, 3).reshape(self.ny * self.nx, -1)
        )

    def centres(self, hb: int, wb: int, f: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-resolution x, y of each box's centre (the ragged last boxes' own centre)."""
        s = self.size

        def axis(n_boxes: int, length: int) -> np.ndarray:
            start = np.arange(n_boxes) * s
            end = np.minimum(start + s, length)
            return f * (start + end - 1) / 2.0 + (f - 1) / 2.0

        cx, cy = np.meshgrid(axis(self.nx, wb), axis(self.ny, hb))
        return cx.ravel(), cy.ravel()


def _row_medians(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of the finite values of each row, and how many there are (NaN where none).

    One sort of the whole array (NaN sorts last) instead of ``nanmedian``'s row-by-row loop.
    """
    srt = np.sort(blocks, axis=1)
    n = np.isfinite(srt).sum(axis=1)
    rows = np.arange(srt.shape[0])
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    med = 0.5 * (srt[rows, lo] + srt[rows, hi])
    return np.where(n > 0, med, np.nan), n


def _pixel_noise(lum: np.ndarray, boxes: _Boxes) -> float:
    """Per-pixel sky noise of the working copy: second differences, per box, low quantile.

    Second differences cancel a smooth sky; a nebula's fine texture does not, so boxes on a
    nebula read noisier. The 25th percentile over boxes is the sky's noise as long as a
    quarter of the frame is sky, and reads a little low rather than high otherwise (which
    only makes the masks stricter).
    """
    d = np.full(lum.shape, np.nan, np.float32)
    d[:, 1:-1] = lum[:, 1:-1] - 0.5 * (lum[:, :-2] + lum[:, 2:])
    blocks = boxes.blocks(d)
    med, _ = _row_medians(blocks)
    mad, _ = _row_medians(np.abs(blocks - med[:, None]))
    sigma = 1.4826 * mad / math.sqrt(1.5)
    sigma = sigma[np.isfinite(sigma) & (sigma > 0)]
    return float(np.percentile(sigma, 25)) if sigma.size else 0.0


def _star_mask(lum: np.ndarray, boxes: _Boxes, noise: float, f: int) -> np.ndarray:
    """True where a working pixel is sky: not on a star or its wings, and finite.

    A star is where the 3x3 mean of the excess over the local sky (the boxes' medians,
    interpolated bilinearly and extrapolated linearly past the outer box centres, as
    ``measure.background`` does) stands ``STAR_SIGMA`` times that mean's own noise (noise / 3)
    above it: a star's core lights several neighbouring pixels, a lone noise pixel does not,
    so the mask does not grow around every fluctuation of the sky. It is grown by a star's
    wings (a few px at full resolution).
    """
    hb, wb = lum.shape
    local = _row_medians(boxes.blocks(lum))[0].reshape(boxes.ny, boxes.nx)
    if np.isfinite(local).any():
        local = np.where(np.isfinite(local), local, np.nanmedian(local))
    centre = (boxes.size - 1) / 2.0
    mesh = Background(
        level=0.0,
        noise=noise,
        mesh=local,
        box=boxes.size,
        origin=(centre, centre),
        step=(float(boxes.size), float(boxes.size)),
    )
    excess = np.nan_to_num(lum - mesh.grid((hb, wb)), nan=0.0)
    mean3 = cv2.blur(excess, (3, 3), borderType=cv2.BORDER_REFLECT)
    bright = (mean3 > STAR_SIGMA * noise / 3.0).astype(np.uint8)
    radius = max(1, round(3 / f))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    bright = cv2.dilate(bright, kernel).astype(bool)
    return ~bright & np.isfinite(lum) & (lum != 0)


def _box_samples(work: np.ndarray, sky: np.ndarray, boxes: _Boxes) -> tuple[np.ndarray, np.ndarray]:
    """Per box: median of the sky pixels per channel (n_boxes, C), and their count."""
    values = []
    count = np.zeros(boxes.ny * boxes.nx, np.int64)
    for c in range(work.shape[2]):
        plane = np.where(sky, work[:, :, c], np.float32(np.nan))
        med, count = _row_medians(boxes.blocks(plane))
        values.append(med)
    return np.stack(values, axis=1), count


# ----------------------------------------------------------------------------- fitting


def _select_sky(
    poly: _Polynomial,
    x: np.ndarray,
    y: np.ndarray,
    values: np.ndarray,
    floor: np.ndarray,
    usable: np.ndarray,
) -> np.ndarray:
    """Fit, drop boxes above the surface, refit, with a tolerance that shrinks to the noise.

    Dropping every box above the noise after the first fit (which the nebula pulls up) would
    also drop the sky wherever that fit sits too low, and the surface would sink under the
    sky for good. Starting wide and shrinking by ``SHRINK`` a round lets the surface come
    down with the sky boxes still in it; at each tolerance the fit is iterated until the set
    of boxes is stable (boxes come back when the surface rises to them). ``floor`` is the
    final tolerance per box (ADU). Returns the sky boxes; ``poly`` is left fitted to them.
    """
    lum = values.mean(axis=1)
    keep = usable.copy()
    resid = lum - poly.fit(x[keep], y[keep], values[keep]).at_points(x, y).mean(axis=1)
    level = 3.0 * 1.4826 * float(np.median(np.abs(resid[keep])))
    while True:
        tolerance = np.maximum(floor, level)
        for _ in range(MAX_ITERATIONS):
            new = usable & (resid <= tolerance)
            if np.array_equal(new, keep) or new.sum() < len(_terms(poly.order)):
                break
            keep = new
            resid = lum - poly.fit(x[keep], y[keep], values[keep]).at_points(x, y).mean(axis=1)
        if level <= float(np.min(floor)):
            return keep
        level *= SHRINK


def _min_samples(order: int) -> int:
    """Sky boxes wanted for a polynomial of ``order``: twice its terms, and a few."""
    return 2 * len(_terms(order)) + 4


def _fit_spline(
    poly: _Polynomial,
    x: np.ndarray,
    y: np.ndarray,
    values: np.ndarray,
    sigma: np.ndarray,
    floor: np.ndarray,
    usable: np.ndarray,
    keep: np.ndarray,
) -> tuple[_Spline, np.ndarray]:
    """The spline on the polynomial's sky boxes, with the same one-sided clipping after it."""
    lum = values.mean(axis=1)
    noise = float(np.median(sigma[keep]))
    spline = _Spline(poly)
    for _ in range(3):
        spline.fit(x[keep], y[keep], values[keep], noise)
        resid = lum - spline.at_points(x, y).mean(axis=1)
        new = usable & (resid <= floor)
        if np.array_equal(new, keep) or new.sum() < _min_samples(1):
            break
        keep = new
    return spline, keep


def fit_gradient(
    image: np.ndarray, *, method: str = "polynomial", order: int = 2, grid: int = 32
) -> GradientModel:
    """Model the sky background of a linear image (ADU); see the module doc for the method.

    ``method`` is ``polynomial`` (``order`` 1-4) or ``rbf`` (a smoothed thin-plate spline);
    ``grid`` is the number of sample boxes along the longer side. Colour images (H, W, C)
    get one surface per channel, fitted to the same sky boxes.
    """
    if method not in METHODS:
        raise ValueError(f"gradient method must be one of {METHODS}, not {method!r}")
    if not 1 <= order <= 4:
        raise ValueError(f"polynomial order must be 1-4, not {order}")
    planes = as_planes(image)
    h, w, _ = planes.shape
    f = _binning(h, w)
    work = _bin(planes, f)
    hb, wb = work.shape[:2]
    lum = work[:, :, 0] if work.shape[2] == 1 else work.mean(axis=2)
    boxes = _Boxes.for_shape(hb, wb, grid)
    noise = _pixel_noise(lum, boxes)
    sky_px = _star_mask(lum, boxes, noise, f)
    values, count = _box_samples(work, sky_px, boxes)
    x, y = boxes.centres(hb, wb, f)
    usable = (count >= MIN_SKY_SHARE * boxes.size**2) & np.isfinite(values).all(axis=1)
    if usable.sum() < len(_terms(1)):
        return _flat_model(planes, np.ndim(image) == 2, method)
    # Error of a median of n pixels: 1.2533 sigma / sqrt(n). The tolerance for a sky box is
    # that, or a small share of the sky level where a deep stack makes it smaller still.
    sigma = 1.2533 * noise / np.sqrt(np.maximum(count, 1))
    level = abs(float(np.median(values[usable].mean(axis=1))))
    floor = np.maximum(BOX_SIGMA * sigma, SKY_FLOOR * level)

    frame = _Frame(w, h)
    fitted = order
    while True:
        poly = _Polynomial(frame, fitted)
        keep = _select_sky(poly, x, y, values, floor, usable)
        if keep.sum() >= _min_samples(fitted) or fitted == 1:
            break
        fitted -= 1  # too few sky boxes for this many terms: a lower order extrapolates safer
    surface: _Surface = poly
    if method == "rbf":
        surface, keep = _fit_spline(poly, x, y, values, sigma, floor, usable, keep)

    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    background = surface.on_grid(xs, ys)
    if np.ndim(image) == 2:
        background = background[:, :, 0]
    mask = _full_mask(sky_px, keep.reshape(boxes.ny, boxes.nx), boxes, (h, w))
    coarse = _coarse_luminance(surface, frame)
    level = float(np.median(coarse))
    return GradientModel(
        background=background,
        mask=mask,
        amplitude_percent=float(100.0 * (coarse.max() - coarse.min()) / max(abs(level), 1e-12)),
        angle_deg=_angle(coarse, frame),
        method=method,
        order=fitted,
        level=level,
        samples=int(keep.sum()),
        boxes=int(keep.size),
    )


def _flat_model(planes: np.ndarray, mono: bool, method: str) -> GradientModel:
    """No sky to fit (a frame all nebula, or too small): a level sky at the channels' medians."""
    h, w, c = planes.shape
    step = max(1, int(math.sqrt(h * w / 250_000)))
    sample = planes[::step, ::step].reshape(-1, c)
    medians = np.nan_to_num(np.nanmedian(sample, axis=0)).astype(np.float32) if sample.size else 0
    background = np.broadcast_to(np.asarray(medians, np.float32), (h, w, c)).copy()
    return GradientModel(
        background=background[:, :, 0] if mono else background,
        mask=np.zeros((h, w), bool),
        amplitude_percent=0.0,
        angle_deg=0.0,
        method=method,
        order=0,
        level=float(np.mean(medians)),
    )


def _full_mask(
    sky_px: np.ndarray, keep: np.ndarray, boxes: _Boxes, shape: tuple[int, int]
) -> np.ndarray:
    """The sky pixels of the kept boxes, at full resolution."""
    s = boxes.size
    hb, wb = sky_px.shape
    in_kept = np.kron(keep.astype(np.uint8), np.ones((s, s), np.uint8))[:hb, :wb]
    work_mask = (sky_px & in_kept.astype(bool)).astype(np.uint8)
    h, w = shape
    return cv2.resize(work_mask, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _coarse_luminance(surface: _Surface, frame: _Frame, n: int = 65) -> np.ndarray:
    """The luminance model on an n x n grid spanning the frame edge to edge."""
    xs = np.linspace(0, frame.width - 1, n)
    ys = np.linspace(0, frame.height - 1, n)
    return surface.on_grid(xs, ys).mean(axis=2)


def _angle(coarse: np.ndarray, frame: _Frame) -> float:
    """Direction of brightening, as the per-sub gradient reports it (a plane's slope)."""
    n = coarse.shape[0]
    step = ((frame.width - 1) / (n - 1), (frame.height - 1) / (n - 1))
    mesh = Background(level=float(np.median(coarse)), noise=0.0, mesh=coarse, box=1, step=step)
    return measure_gradient(mesh, (frame.height, frame.width)).angle_deg


# ----------------------------------------------------------------------------- removal


def remove_gradient(image: np.ndarray, model: GradientModel, mode: str = "subtract") -> np.ndarray:
    """The image without its gradient, float32, same shape.

    ``subtract``: ``image - background + median(background)`` per channel, so the sky stays
    at its level (flat) rather than at zero. ``divide``: ``image / (background /
    median(background))``, for multiplicative residuals (vignetting the flats missed).
    """
    if mode not in ("subtract", "divide"):
        raise ValueError(f"gradient mode must be subtract or divide, not {mode!r}")
    img = np.asarray(image, np.float32)
    bg = model.background
    if bg.shape != img.shape:
        raise ValueError(f"model shape {bg.shape} does not match the image's {img.shape}")
    planes_bg = bg if bg.ndim == 3 else bg[:, :, None]
    step = max(1, int(math.sqrt(bg.shape[0] * bg.shape[1] / 250_000)))
    medians = np.median(planes_bg[::step, ::step].reshape(-1, planes_bg.shape[2]), axis=0)
    medians = medians.astype(np.float32)
    if bg.ndim == 2:
        medians = medians[0]
    if mode == "subtract":
        out = img - bg
        out += medians
        return out
    floor = np.float32(1e-3) * np.abs(medians)
    return img * (medians / np.maximum(bg, floor))
