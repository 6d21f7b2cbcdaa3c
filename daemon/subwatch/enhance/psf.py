"""The point-spread function of a stack, measured from its own stars.

Deconvolution is only as good as its PSF, and the best witness of a stack's PSF is the stack
itself: every star in it is the PSF, shifted and scaled. The method, in plain words:

1. *Find good stars.* The per-frame star finder (``subwatch.measure.stars``) already detects
   the stars, drops hot pixels, knots of nebula and blends, and fits the brightest isolated,
   unsaturated ones with a circular Moffat profile. We take those fits (centre, FWHM, beta)
   and keep the stars whose width and beta agree with the rest (three robust spreads):
   a star left with a neighbour's light or a slightly clipped core is an outlier. A stack has
   no saturation keyword, so clipped cores are recognised by the plateau they form at the
   top of the image, and stars reaching it are left out.
2. *One shape, many stars.* All kept stars are fitted *together* with one elliptical Moffat
   profile, ``(1 + c rho^2)^-beta`` with ``rho^2 = d^T Q d`` for the offset ``d`` from the
   star's centre and ``c = 4 (2^(1/beta) - 1)``, so that ``rho = 1/2`` is the half maximum.
   The symmetric matrix ``Q`` carries the FWHM along the two axes and the angle; beta the
   wings. The centres are the star finder's (a circular fit finds the centre of an elliptical
   star too, by symmetry); each star's amplitude and local sky enter linearly and are solved
   exactly for every trial shape (variable projection), so the non-linear fit has only four
   parameters and each star counts by its shape, not its brightness. A star that fits much
   worse than the others is dropped and the fit repeated once.
3. *The kernel.* The fitted profile sampled at pixel centres (as a star is sampled by the
   sensor) on a ``size x size`` grid, normalised to a sum of 1.

Optics rarely give one PSF over the whole field (coma, tilt, field curvature), so on request
the same fit is made in each cell of a 3x3 grid, from the stars in that cell (a cell with too
few stars borrows from its neighbours, then falls back to the whole field).
``PSFModel.kernel_at`` interpolates between the cells' kernels, which is what the deconvolver
uses for each of its tiles.

A model rather than an averaged image of the stars (an empirical PSF) is used because the
kernel's wings matter to Richardson-Lucy and an average of noisy stamps has noise there; a
Moffat profile describes ground-based seeing well (Trujillo et al. 2001) and its four numbers
are what ``status.json`` reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from subwatch.measure.background import Pyramid, estimate_background
from subwatch.measure.frame import RETRY_WIDER, luminance
from subwatch.measure.stars import StarList, _gather, detect_stars

#: Fewer good stars than this and no PSF is returned.
MIN_STARS = 5
#: A grid cell needs this many stars of its own; fewer and it borrows from its neighbours.
CELL_MIN_STARS = 5
#: Stars fitted for the whole field, and for a 3x3 grid.
FIT_STARS = 100
GRID_FIT_STARS = 360
#: The top of the image counts as a saturation plateau when this many pixels lie within
#: 10 % of the maximum (above the median); stars reaching ``SATURATION_FRACTION`` of it are
#: then left out.
PLATEAU_PIXELS = 8
SATURATION_FRACTION = 0.75


@dataclass
class PSFModel:
    """A measured PSF: the kernel, its Moffat parameters and (optionally) a 3x3 grid of them.

    ``kernel`` is float32, odd-sized, sums to 1, sampled at pixel centres. ``fwhm`` (px) is the
    geometric mean of the FWHM along the two axes; ``ellipticity`` is ``1 - minor / major``
    and ``angle`` (degrees, 0-180, from +x towards +y) the direction of the major axis.
    ``grid[row][col]`` holds the kernels of the 3x3 cells, row 0 at the top (smallest y), and
    ``cells`` their parameters as dictionaries.
    """

    kernel: np.ndarray
    fwhm: float
    beta: float
    n_stars: int
    grid: list[list[np.ndarray]] | None = None
    ellipticity: float = 0.0
    angle: float = 0.0
    cells: list[list[dict]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-able parameters (no arrays), as ``status.json`` reports them."""
        out: dict = {
            "model": "moffat",
            "fwhm": round(float(self.fwhm), 4),
            "beta": round(float(self.beta), 4),
            "ellipticity": round(float(self.ellipticity), 4),
            "angle": round(float(self.angle), 2),
            "n_stars": int(self.n_stars),
            "size": int(self.kernel.shape[0]),
        }
        if self.cells is not None:
            out["grid"] = [[dict(cell) for cell in row] for row in self.cells]
        return out

    def kernel_at(self, x: float, y: float, shape: tuple[int, int]) -> np.ndarray:
        """The kernel at pixel (x, y) of an image of ``shape``: bilinear between the grid cells'
        kernels (their centres are the cells' centres), or the single kernel without a grid."""
        if self.grid is None:
            return self.kernel
        h, w = shape
        n = len(self.grid)
        u = float(np.clip(x / w * n - 0.5, 0.0, n - 1.0))
        v = float(np.clip(y / h * n - 0.5, 0.0, n - 1.0))
        j0, i0 = min(int(u), n - 2), min(int(v), n - 2)
        fu, fv = u - j0, v - i0
        k = (
            (1 - fv) * ((1 - fu) * self.grid[i0][j0] + fu * self.grid[i0][j0 + 1])
            + fv * ((1 - fu) * self.grid[i0 + 1][j0] + fu * self.grid[i0 + 1][j0 + 1])
        ).astype(np.float32)
        return k / k.sum(dtype=np.float64)


@dataclass
class _Shape:
    """Fitted elliptical Moffat shape."""

    q: np.ndarray  # (3,) Q11, Q12, Q22: rho^2 = Q11 dx^2 + 2 Q12 dx dy + Q22 dy^2
    beta: float
    n_stars: int

    @property
    def axes(self) -> tuple[float, float, float]:
        """FWHM along the major and the minor axis (px) and the major axis' angle (deg)."""
        mat = np.array([[self.q[0], self.q[1]], [self.q[1], self.q[2]]])
        values, vectors = np.linalg.eigh(mat)  # ascending: the smallest is the major axis
        major, minor = 1.0 / math.sqrt(values[0]), 1.0 / math.sqrt(values[1])
        vx, vy = vectors[:, 0]
        angle = math.degrees(math.atan2(vy, vx)) % 180.0
        return major, minor, angle

    def params(self) -> dict:
        major, minor, angle = self.axes
        return {
            "fwhm": round(math.sqrt(major * minor), 4),
            "beta": round(self.beta, 4),
            "ellipticity": round(1.0 - minor / major, 4),
            "angle": round(angle, 2),
            "n_stars": self.n_stars,
        }


def moffat_kernel(
    size: int, fwhm: float, beta: float, ellipticity: float = 0.0, angle: float = 0.0
) -> np.ndarray:
    """A Moffat PSF sampled at pixel centres on a ``size x size`` grid, summing to 1.

    ``fwhm`` is the geometric mean of the two axes' FWHM (px), ``ellipticity`` ``1 - b/a``,
    ``angle`` the major axis' direction in degrees from +x towards +y.
    """
    if size % 2 == 0 or size < 3:
        raise ValueError("the PSF size must be odd and at least 3")
    ratio = 1.0 - ellipticity
    major, minor = fwhm / math.sqrt(ratio), fwhm * math.sqrt(ratio)
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    ia, ib = 1.0 / major**2, 1.0 / minor**2
    q = np.array([ia * c * c + ib * s * s, (ia - ib) * c * s, ia * s * s + ib * c * c])
    return _kernel(size, q, beta)


def _kernel(size: int, q: np.ndarray, beta: float) -> np.ndarray:
    h = size // 2
    offs = np.arange(-h, h + 1, dtype=np.float64)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    k = _profile(dx, dy, q, beta)
    return (k / k.sum()).astype(np.float32)


def _profile(dx: np.ndarray, dy: np.ndarray, q: np.ndarray, beta: float) -> np.ndarray:
    """Unit-peak elliptical Moffat at offsets (dx, dy)."""
    c = 4.0 * (2.0 ** (1.0 / beta) - 1.0)
    rho2 = q[0] * dx * dx + 2.0 * q[1] * dx * dy + q[2] * dy * dy
    return np.exp(-beta * np.log1p(c * np.maximum(rho2, 0.0)))


def saturation_level(image: np.ndarray) -> float | None:
    """The level above which star cores count as clipped, when the image shows a plateau.

    Clipped stars of a stack share one flat top (the full well, scaled and averaged), so many
    pixels lie within 10 % of the maximum; an image whose brightest star is intact has only a
    handful there. When two or three intact stars happen to be that close in brightness the
    rule fires needlessly, which costs the fit those few brightest stars and nothing else.
    """
    finite = image if np.isfinite(image).all() else image[np.isfinite(image)]
    if finite.size == 0:
        return None
    top = float(finite.max())
    median = float(np.median(finite[:: max(1, finite.size // 100_000)]))
    if top <= median:
        return None
    near = np.count_nonzero(finite >= median + 0.9 * (top - median))
    if near < PLATEAU_PIXELS:
        return None
    return median + SATURATION_FRACTION * (top - median)


def _good_stars(stars: StarList) -> np.ndarray:
    """Indices of the fitted, unsaturated stars whose FWHM and beta agree with the others."""
    sel = np.flatnonzero(
        stars.fitted & ~stars.saturated & np.isfinite(stars.fwhm) & np.isfinite(stars.beta)
    )
    if sel.size < MIN_STARS:
        return sel
    keep = np.ones(sel.size, bool)
    for values in (np.log(stars.fwhm[sel]), np.log(stars.beta[sel])):
        med = np.median(values)
        spread = max(1.4826 * float(np.median(np.abs(values - med))), 0.02)
        keep &= np.abs(values - med) <= 3.0 * spread
    return sel[keep]


@dataclass
class _Stamps:
    """Pixels of the stars to fit: offsets from each star's centre and the values."""

    dx: np.ndarray  # (n, p) offsets, px
    dy: np.ndarray
    data: np.ndarray  # (n, p) ADU
    weight: np.ndarray  # (n, p) 1 inside the fitting disc and the image, else 0
    scale: np.ndarray  # (n,) peak estimate: residuals are measured in units of it


def _stamps(image: np.ndarray, stars: StarList, idx: np.ndarray, radius: int) -> _Stamps:
    ix = np.rint(stars.x[idx]).astype(np.int64)
    iy = np.rint(stars.y[idx]).astype(np.int64)
    raw, inside = _gather(image, ix, iy, radius)
    n = idx.size
    offs = np.arange(-radius, radius + 1, dtype=np.float64)
    dx = offs[None, None, :] - (stars.x[idx] - ix)[:, None, None]
    dy = offs[None, :, None] - (stars.y[idx] - iy)[:, None, None]
    dx, dy = np.broadcast_to(dx, raw.shape), np.broadcast_to(dy, raw.shape)
    disc = (dx * dx + dy * dy) <= radius * radius
    weight = (disc & inside).reshape(n, -1).astype(np.float64)
    scale = np.maximum(stars.peak[idx].astype(np.float64), 1e-6)
    return _Stamps(
        dx.reshape(n, -1), dy.reshape(n, -1), raw.reshape(n, -1).astype(np.float64), weight, scale
    )


def _residuals(p: np.ndarray, s: _Stamps) -> np.ndarray:
    """Residuals of the best amplitude and sky of every star for the shape ``p``."""
    q = p[:3]
    beta = p[3]
    if q[0] <= 0 or q[2] <= 0 or q[0] * q[2] <= q[1] * q[1] or beta <= 1.01:
        return np.full(s.data.size, 1e3)
    m = _profile(s.dx, s.dy, q, beta)
    w = s.weight
    # Per star, least squares of data = a m + b over the weighted pixels (2x2 normal equations).
    sw, sm, sd = w.sum(1), (w * m).sum(1), (w * s.data).sum(1)
    smm, smd = (w * m * m).sum(1), (w * m * s.data).sum(1)
    det = sw * smm - sm * sm
    det = np.where(np.abs(det) > 1e-12, det, 1e-12)
    a = (sw * smd - sm * sd) / det
    b = (smm * sd - sm * smd) / det
    res = w * (s.data - a[:, None] * m - b[:, None]) / s.scale[:, None]
    return res.ravel()


def _fit_shape(s: _Stamps, fwhm0: float, beta0: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Fit Q and beta to the stamps; returns them and each star's rms residual."""
    q0 = 1.0 / (fwhm0 * fwhm0)
    p0 = np.array([q0, 0.0, q0, max(beta0, 1.2)])
    fit = least_squares(
        _residuals, p0, args=(s,), method="lm", x_scale=np.array([q0, q0, q0, 1.0]), xtol=1e-8
    )
    res = fit.fun.reshape(s.data.shape)
    rms = np.sqrt((res * res).sum(1) / np.maximum(s.weight.sum(1), 1.0))
    return fit.x[:3], float(fit.x[3]), rms


def _fit(
    image: np.ndarray, stars: StarList, idx: np.ndarray, radius: int, fwhm0: float, beta0: float
) -> _Shape | None:
    if idx.size < MIN_STARS:
        return None
    s = _stamps(image, stars, idx, radius)
    q, beta, rms = _fit_shape(s, fwhm0, beta0)
    # Stars fitting far worse than the rest (an undetected neighbour, a galaxy): drop, refit.
    worse = rms > 3.0 * np.median(rms)
    if worse.any() and (~worse).sum() >= MIN_STARS:
        idx = idx[~worse]
        s = _stamps(image, stars, idx, radius)
        q, beta, rms = _fit_shape(s, fwhm0, beta0)
    if not (q[0] > 0 and q[2] > 0 and q[0] * q[2] > q[1] * q[1] and 1.01 < beta < 50):
        return None
    return _Shape(q=q, beta=beta, n_stars=int(idx.size))


def _cell_stars(
    stars: StarList, idx: np.ndarray, shape: tuple[int, int], row: int, col: int, grow: float
) -> np.ndarray:
    """Stars of ``idx`` in grid cell (row, col), the cell grown by ``grow`` cells each side."""
    h, w = shape
    ch, cw = h / 3.0, w / 3.0
    x0, x1 = (col - grow) * cw, (col + 1 + grow) * cw
    y0, y1 = (row - grow) * ch, (row + 1 + grow) * ch
    x, y = stars.x[idx], stars.y[idx]
    return idx[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)]


def measure_psf(image: np.ndarray, *, size: int = 25, grid: bool = False) -> PSFModel | None:
    """Measure the PSF of a linear image (a stack) from its isolated, unsaturated stars.

    Returns ``None`` when fewer than ``MIN_STARS`` good stars are found. Colour images
    (H, W, 3) are measured on their luminance. ``size`` (odd) is the kernel's side in pixels;
    ``grid`` adds a 3x3 grid of kernels across the field.
    """
    if size % 2 == 0 or size < 5:
        raise ValueError("size must be odd and at least 5")
    lum = np.ascontiguousarray(luminance(image), dtype=np.float32)
    if not np.isfinite(lum).all():
        lum = np.nan_to_num(lum, nan=float(np.nanmedian(lum)), posinf=0.0, neginf=0.0)
    pyramid = Pyramid(lum)
    bkg = estimate_background(lum, pyramid=pyramid)
    saturation = saturation_level(lum)
    n_fit = GRID_FIT_STARS if grid else FIT_STARS

    def detect(guess: float) -> StarList:
        return detect_stars(
            lum,
            bkg,
            pyramid=pyramid,
            saturation=saturation,
            fwhm_guess=guess,
            max_stars=max(300, 2 * n_fit),
            max_fit=n_fit,
        ).stars

    guess = 3.0
    stars = detect(guess)
    good = _good_stars(stars)
    if good.size >= MIN_STARS and np.median(stars.fwhm[good]) > RETRY_WIDER * guess:
        guess = float(np.median(stars.fwhm[good]))
        stars = detect(guess)
        good = _good_stars(stars)
    if good.size < MIN_STARS:
        return None
    fwhm0 = float(np.median(stars.fwhm[good]))
    beta0 = float(np.median(stars.beta[good]))
    # Out to about three FWHM, where beta shows; the star finder made sure no other detection
    # lies that close to a fitted star.
    radius = int(
        np.clip(math.ceil(3.0 * fwhm0), 4, min(size // 2, np.clip(math.ceil(2.5 * guess), 6, 40)))
    )
    whole = _fit(lum, stars, good, radius, fwhm0, beta0)
    if whole is None:
        return None
    kernels: list[list[np.ndarray]] | None = None
    cells: list[list[dict]] | None = None
    if grid:
        kernels, cells = [], []
        for row in range(3):
            krow, crow = [], []
            for col in range(3):
                shape_fit, source = None, "global"
                for grow, name in ((0.0, "cell"), (0.5, "neighbours")):
                    idx = _cell_stars(stars, good, lum.shape, row, col, grow)
                    if idx.size >= CELL_MIN_STARS:
                        shape_fit = _fit(lum, stars, idx, radius, fwhm0, beta0)
                        if shape_fit is not None:
                            source = name
                            break
                shape_fit = shape_fit or whole
                krow.append(_kernel(size, shape_fit.q, shape_fit.beta))
                crow.append({**shape_fit.params(), "source": source})
            kernels.append(krow)
            cells.append(crow)
    params = whole.params()
    return PSFModel(
        kernel=_kernel(size, whole.q, whole.beta),
        fwhm=params["fwhm"],
        beta=params["beta"],
        n_stars=whole.n_stars,
        grid=kernels,
        ellipticity=params["ellipticity"],
        angle=params["angle"],
        cells=cells,
    )
