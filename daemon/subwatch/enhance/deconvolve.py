"""Richardson-Lucy deconvolution of a linear stack: regularised, protected, and quick.

Richardson-Lucy (RL) finds the sharp image ``u`` whose blur by the PSF ``K`` best explains the
data ``d`` under photon (Poisson) noise, by the multiplicative update
``u <- u * K^T (d / K u)``. It keeps ``u`` positive and the total flux unchanged, which is why
astronomers have used it since Lucy (1974). Left alone it has three well-known faults, and each
has an answer here.

* *It sharpens towards points.* Run long enough, RL turns every star into a pixel or two and
  rings around it: a star's sub-pixel position cannot be drawn on the pixel grid with a PSF
  narrower than a pixel. So the goal is not a point but a smaller, still sampled PSF: the
  image the sky would give through a round Gaussian ``T`` of ``TARGET_RATIO`` times the
  measured FWHM. RL runs with the kernel ``K'`` for which ``K' * T = K`` (found once per PSF
  by RL on the kernel itself, so it stays positive); its answer is ``sky * T``, positive and
  smooth, which RL can converge to. This is BlurXTerminator's narrower target (see
  research/denoiser.md). Stars come out round and alike across the field, whatever the
  measured PSF's shape.
* *It amplifies noise.* Each iteration fits the noise a little more. Three things hold it
  back. The background is in the model: RL works on ``d - sky + P`` with a pedestal ``P`` of
  ``PEDESTAL`` noise sigmas. RL's Poisson model then treats a signal ``s`` as having variance
  ``sigma^2 (1 + s / P)``, so anything much fainter than ``P`` is handled as the Gaussian
  sky noise it is, and only bright structure is sharpened hard (a sky-limited stack's true
  ``P`` is its sky level, tens to hundreds of sigmas; too small a pedestal makes faint stars
  steal flux from the sky around them). Total-variation regularisation (Dey et al. 2006)
  divides each update by ``1 - lambda div(grad u / |grad u|)``, which damps small
  oscillations and keeps edges. And the result is used only where there is signal: a mask
  from the local signal-to-noise ratio (the image filtered with a Gaussian of the star's
  size, in units of its own noise, ramping from 3 to 5 sigma, grown by two FWHM and
  feathered) blends the deconvolved image into the original, so star-free sky keeps its
  noise exactly.
* *It digs dark rings around bright stars.* Where the model overshoots (a clipped core, a
  PSF a little off, the pixel grid), RL pulls the pixels beside a bright star below the sky.
  Nothing is darker than the sky behind it, so every iteration clamps ``u`` at a local floor:
  a median over about six FWHM (5x5 blocks of a binned copy), which follows the sky and
  nebulae but not stars, less ``FLOOR_SIGMA`` noise sigmas.

*When to stop.* A fixed, large iteration count either under-sharpens a faint stack or fits
the noise of a bright one. The iterations stop when one changes ``u`` over the signal mask by
less than ``tolerance`` of the signal there that stands above the local floor (the stars,
not a nebula's smooth light, which converges at once and would stop the stars early), or at
``max_iterations``. That is judged once for the image, on the ``PILOT`` tiles with the most
compact signal stepped together, and every tile then runs as many iterations: tiles judging
for themselves stopped faint tiles a few iterations early, and their stars came out less
sharp than the rest (a 5-sub stack: FWHM -27 % tiled against -32 % as one tile; now both
-33 %). A tile also stops on its own when ``K'u`` explains its data over the mask to the
noise (chi^2 per pixel <= 1, the discrepancy principle: there is nothing left to explain; a
tile explained from the start is left as it is), and a tile without any signal is not
touched.

*Speed.* Iterations are accelerated by extrapolation: each starts from
``u + alpha_k (u - u_previous)`` (clamped at the floor) with Nesterov's schedule
``alpha_k = (k - 1) / (k + 2)``, capped at ``ACCELERATION``, which halves the iterations a
given sharpness takes. Biggs & Andrews (1997) derive ``alpha`` from how the last two steps
agreed; here that rule gives values rising from about 0.6 to the cap over ten iterations,
close to the schedule, but computed per tile they sent neighbouring tiles down different
paths (star cores on a tile boundary differed by up to half their brightness), while a fixed
schedule keeps every tile on the same path. Convolutions are real FFTs (OpenCV's ``dft``,
float32) with the kernel's transfer function computed once; a point-symmetric kernel's is
real, and a spectrum is then multiplied by it with one element-wise product. A real transfer
function also lets two tiles share their transforms: ``a + ib`` through one complex DFT,
product and inverse gives both convolutions, so with one PSF for the image the tiles are
stepped two by two (a 26 MP deconvolution 7.3-8.3 s against 8.5-12.3 s). The image is
cut into 512x512 tiles that overlap by ``MARGIN`` px; each is deconvolved on its own (its
arrays stay in the cache, two threads take two tiles or pairs) and only its core is kept: two
different tilings agree to 0.2 % of the signal. The per-pixel work of an iteration
(extrapolation, ratio and residual, TV term, update, floor, statistics) is two compiled
passes, compiled with numpy's error model: under the default (Python's) every division first
checks its divisor for zero, and that branch keeps the loops from vectorising (on one tile in
the cache the ratio pass took 7x and the update 3x as long; the whole 26 MP deconvolution
12.8-14.3 s against 7.6-10.0 s, alternating in one process, equal to 2e-6). With a 3x3
grid of PSFs each tile uses the kernel interpolated at its centre, so the PSF changes
smoothly across the field.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numba
import numpy as np
import scipy.fft as sfft

from subwatch.enhance.psf import PSFModel
from subwatch.measure.background import estimate_background

#: The target PSF is a round Gaussian of this fraction of the measured FWHM ...
TARGET_RATIO = 0.5
#: ... and at least this wide (px), so it stays sampled by the pixel grid.
MIN_TARGET_FWHM = 1.5
#: Pedestal added under the data, in noise sigmas: the background in the forward model.
PEDESTAL = 30.0
#: The local floor lies this many noise sigmas below the local median.
FLOOR_SIGMA = 2.0
#: The signal mask ramps from 0 to 1 between these matched-filter SNRs.
MASK_SNR = (3.0, 5.0)
#: The iterations stop when one changes the image over the signal mask by less than this
#: fraction of the signal there above the local floor.
TOLERANCE = 0.003
#: FFT tile side and the margin (px) cut from each tile's sides.
TILE = 512
MARGIN = 24
#: Largest extrapolation factor of the accelerated iterations (0 turns acceleration off).
ACCELERATION = 0.8
#: An estimated sky is computed on a grid binned this much and enlarged window by window.
SKY_BINNING = 4
#: Tiles (those with the most stars) whose joint convergence sets the iteration count.
PILOT = 4
#: Threads: one tile each.
THREADS = 2


@dataclass
class Deconvolved:
    """A deconvolved image (linear, float32, the input's shape) and how it was obtained.

    ``iterations`` is the count every tile with signal ran (fewer where a tile's data was
    explained to the noise level sooner; the most over the channels of a colour image);
    ``stopped`` says why the iterations ended: ``converged``, ``noise level``,
    ``max_iterations`` or ``no signal`` (one per channel where they differ). ``tiles``
    counts the tiles by how each ended.
    """

    image: np.ndarray
    iterations: int
    stopped: str
    seconds: float
    tiles: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- kernels


def gaussian_kernel(size: int, fwhm: float) -> np.ndarray:
    """A round Gaussian sampled at pixel centres, ``size x size``, summing to 1."""
    h = size // 2
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    g = np.exp(-0.5 * (np.arange(-h, h + 1) / sigma) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def effective_kernel(kernel: np.ndarray, target: np.ndarray, iterations: int = 100) -> np.ndarray:
    """The positive kernel ``K'`` with ``K' * target = kernel``, found by RL on the kernel.

    Deconvolving with ``K'`` turns stars into copies of ``target`` rather than points.
    ``kernel`` may be a stack of kernels (..., n, n); ``target`` must be point-symmetric (a
    Gaussian), so that correlating with it is convolving with it.
    """
    k = np.asarray(kernel, np.float64)
    size = k.shape[-1]
    h = size // 2
    n = sfft.next_fast_len(2 * size, real=True)
    spectrum = sfft.rfft2(np.asarray(target, np.float64), s=(n, n))

    def blur(a: np.ndarray) -> np.ndarray:
        full = sfft.irfft2(sfft.rfft2(a, s=(n, n)) * spectrum, s=(n, n))
        return full[..., h : h + size, h : h + size]

    u = k.copy()
    for _ in range(iterations):
        u *= blur(k / np.maximum(blur(u), 1e-300))
    u = np.maximum(u, 0.0)
    return (u / u.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class _Transfer:
    """A kernel's transfer function for a periodic tile, in OpenCV's packed real spectrum
    (``cv2.dft`` of a real array: the tile's shape, float32), divided by the pixel count so
    that the inverse transforms need no scaling pass of their own.

    A point-symmetric kernel (every Moffat PSF, round or elongated, and the kernels derived
    from it) has a real transfer function: a spectrum is then multiplied by it slot by slot,
    re and im by the same factor, which ``packed`` holds in both slots (``real``). That is one
    element-wise multiply, 0.09 against 0.55-0.63 ms for ``cv2.mulSpectrums`` per 512x512
    tile, equal to 1e-7 of the spectrum's largest value; and the kernel's mirror (the adjoint)
    has the same transfer function. Other kernels keep the complex product.
    """

    packed: np.ndarray
    real: bool
    #: With ``real`` and on request: the same factors for a complex spectrum (``cv2.dft``
    #: with ``DFT_COMPLEX_OUTPUT``, (H, W, 2)), each in both slots (``_convolve_pair``).
    full: np.ndarray | None = None


def _otf(kernel: np.ndarray, shape: tuple[int, int], *, paired: bool = False) -> _Transfer:
    """Transfer function of ``kernel``, centred, for a periodic image of ``shape``; ``paired``
    also gives the complex layout that ``_convolve_pair`` needs (real ones only)."""
    pad = np.zeros(shape, np.float32)
    kh, kw = kernel.shape
    pad[:kh, :kw] = kernel
    pad = np.roll(pad, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    scale = np.float32(1.0 / (shape[0] * shape[1]))
    otf = cv2.dft(pad)
    otf *= scale
    k = np.asarray(kernel, np.float64)
    symmetric = (
        kh % 2 == 1
        and kw % 2 == 1
        and float(np.max(np.abs(k - k[::-1, ::-1]))) <= 1e-6 * float(np.max(np.abs(k)))
    )
    if not symmetric:
        return _Transfer(otf, real=False)
    full = None
    if paired:
        re = cv2.dft(pad, flags=cv2.DFT_COMPLEX_OUTPUT)[:, :, 0] * scale
        full = np.ascontiguousarray(np.stack([re, re], axis=2), dtype=np.float32)
    return _Transfer(_real_slots(otf), real=True, full=full)


def _real_slots(packed: np.ndarray) -> np.ndarray:
    """Each imaginary slot of a packed spectrum given the value of its real partner.

    OpenCV packs a real image's spectrum (CCS): along a row, columns ``1, 2``, ``3, 4``, ...
    hold re, im of one frequency (with an even width the last column is the real Nyquist
    term); the first column, and with an even width the last, hold the spectrum of the
    columns at frequency 0 and Nyquist, packed the same way down the rows. For a real
    transfer function every im slot is (numerically) zero and receives its re's value.
    """
    out = packed.copy()
    h, w = packed.shape
    pairs = w - 1 if w % 2 == 0 else w
    out[:, 2:pairs:2] = packed[:, 1 : pairs - 1 : 2]
    edges = (0, w - 1) if w % 2 == 0 else (0,)
    rows = h - 1 if h % 2 == 0 else h
    for c in edges:
        out[2:rows:2, c] = packed[1 : rows - 1 : 2, c]
    return out


def _convolve(
    image: np.ndarray,
    otf: _Transfer,
    adjoint: bool = False,
    *,
    spectrum: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Periodic convolution of ``image`` with the kernel of ``otf`` (its mirror: ``adjoint``).

    OpenCV's real DFT on packed spectra: 1.4x quicker than ``scipy.fft``'s rfft2/irfft2 on a
    512x512 float32 tile here (6.7 vs 9.4 ms per convolution), and it releases the GIL so two
    tiles run on two cores (FFTW through pyfftw measured no quicker: 1.2 ms per transform
    against OpenCV's 0.7-1.0). ``spectrum`` and ``out`` (float32, the image's shape) are
    reused buffers, so a tile's iterations allocate nothing; ``out`` may be ``image`` itself.
    """
    spectrum = cv2.dft(image, dst=spectrum)
    if otf.real:
        np.multiply(spectrum, otf.packed, out=spectrum)
    else:
        cv2.mulSpectrums(spectrum, otf.packed, 0, c=spectrum, conjB=adjoint)
    return cv2.idft(spectrum, dst=out, flags=cv2.DFT_REAL_OUTPUT)


def _convolve_pair(
    a: np.ndarray,
    b: np.ndarray,
    otf: _Transfer,
    buffers: tuple[np.ndarray, np.ndarray],
    out_a: np.ndarray,
    out_b: np.ndarray,
) -> None:
    """Two periodic convolutions with one real transfer function, as one complex transform.

    ``a + ib`` transformed, multiplied by a real transfer function and transformed back is
    ``K*a + i K*b``, exactly: one complex forward and one complex inverse DFT instead of two
    real ones of each, 12-25 % less time per pair of tiles here. ``buffers`` are two
    (H, W, 2) float32 arrays; ``out_a`` and ``out_b`` may be ``a`` and ``b``.
    """
    assert otf.full is not None
    packed, spectrum = buffers
    cv2.merge([a, b], dst=packed)
    cv2.dft(packed, dst=spectrum, flags=cv2.DFT_COMPLEX_OUTPUT)
    np.multiply(spectrum, otf.full, out=spectrum)
    cv2.idft(spectrum, dst=packed, flags=cv2.DFT_COMPLEX_OUTPUT)
    cv2.split(packed, [out_a, out_b])


# --------------------------------------------------------------------------- compiled steps


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _ratio(
    d: np.ndarray, model: np.ndarray, mask: np.ndarray, tiny: np.float32, inv_var: np.float32
) -> float:
    """``model <- d / max(model, tiny)`` in place; returns chi^2 per pixel of ``d - model``
    over the mask (1 inside, 0 outside), for the sky noise of inverse variance ``inv_var``."""
    h, w = d.shape
    total = np.float32(0.0)
    count = np.float32(0.0)
    for i in range(h):
        for j in range(w):
            m = model[i, j]
            r = d[i, j] - m
            total += mask[i, j] * r * r
            count += mask[i, j]
            model[i, j] = d[i, j] / max(m, tiny)
    return float(total) * float(inv_var) / max(float(count), 1.0)


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _direction_row(u: np.ndarray, i: int, eps2: np.float32, px: np.ndarray, py: np.ndarray) -> None:
    """Row ``i`` of ``grad u / sqrt(|grad u|^2 + eps^2)`` by forward differences, with zero
    gradient beyond the last row and column. ``px`` has one more element than a row: the
    value left of the first pixel, 0, sits at index 0, so ``px[j + 1]`` is pixel ``j``."""
    h, w = u.shape
    below = i + 1 if i + 1 < h else i
    for j in range(w - 1):
        gx = u[i, j + 1] - u[i, j]
        gy = u[below, j] - u[i, j]
        inv = np.float32(1.0) / np.sqrt(gx * gx + gy * gy + eps2)
        px[j + 1] = gx * inv
        py[j] = gy * inv
    gy = u[below, w - 1] - u[i, w - 1]
    px[w] = 0.0
    py[w - 1] = gy / np.sqrt(gy * gy + eps2)


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _update(
    u: np.ndarray,
    previous: np.ndarray,
    correction: np.ndarray,
    floor: np.ndarray,
    lam: np.float32,
    eps2: np.float32,
    alpha: np.float32,
    mask: np.ndarray,
    rows: np.ndarray,
) -> tuple[float, float]:
    """One RL-TV step from the extrapolated ``u``, and the extrapolation for the next one.

    ``x = max(u * correction / (1 - lam div(grad u / |grad u|)), floor)`` is the new
    estimate; ``previous`` (the last estimate) becomes ``x`` and ``u`` becomes the next
    starting point ``max(x + alpha (x - previous), floor)``, all in one pass: the TV direction
    field is computed row by row into ``rows`` (3, W + 1) just ahead of the update. Returns
    the sums over the mask (1 inside, 0 outside) of ``|x - u|`` and of ``u - floor``, the
    signal standing out of its surroundings (stars, not a nebula's smooth light).
    """
    h, w = u.shape
    change = np.float32(0.0)
    base = np.float32(0.0)
    low = np.float32(0.5)
    one = np.float32(1.0)
    px, py, py_prev = rows[0], rows[1], rows[2]
    px[:] = 0.0
    py[:] = 0.0
    py_prev[:] = 0.0
    for i in range(h):
        if lam > 0:
            # Row i of the direction field needs rows i and i + 1 of the old u: row i + 1 is
            # untouched until the next pass of this loop.
            _direction_row(u, i, eps2, px, py)
        for j in range(w):
            old = u[i, j]
            f = floor[i, j]
            div = px[j + 1] - px[j] + py[j] - py_prev[j]
            x = max(old * correction[i, j] / max(one - lam * div, low), f)
            last = previous[i, j]
            previous[i, j] = x
            u[i, j] = max(x + alpha * (x - last), f)
            change += mask[i, j] * abs(x - old)
            base += mask[i, j] * (old - f)
        for j in range(w):
            py_prev[j] = py[j]
    return float(change), float(base)


# --------------------------------------------------------------------------- per tile


@dataclass
class _Setup:
    """What every tile of one plane shares."""

    sigma: float  # sky noise, ADU
    pedestal: float  # ADU
    fwhm: float  # px, measured PSF
    lam: float
    max_iterations: int
    tolerance: float
    margin: int


def _signal_mask(tile: np.ndarray, s: _Setup) -> np.ndarray:
    """Blend weight 0..1: matched-filter SNR ramp, grown by two FWHM and feathered."""
    sg = max(s.fwhm / 2.3548, 0.6)
    k1 = cv2.getGaussianKernel(2 * math.ceil(3 * sg) + 1, sg, cv2.CV_32F)
    # The filtered noise is sigma * ||g||_2, and ||g||_2 of the separable 2D kernel is the
    # square of the 1D kernel's.
    norm = float(np.sum(k1.astype(np.float64) ** 2))
    w = cv2.sepFilter2D(tile, cv2.CV_32F, k1, k1, borderType=cv2.BORDER_REFLECT)
    lo, hi = MASK_SNR
    scale = 1.0 / (s.sigma * norm * (hi - lo))
    w -= np.float32(s.pedestal + lo * s.sigma * norm)
    w *= np.float32(scale)
    np.clip(w, 0.0, 1.0, out=w)
    r = max(1, math.ceil(2.0 * s.fwhm))
    box = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    w = cv2.dilate(w, box, borderType=cv2.BORDER_REFLECT)
    return cv2.blur(w, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def _floor(tile: np.ndarray, s: _Setup) -> np.ndarray:
    """Local floor: median of 5x5 blocks of ``f`` px (f ~ 4/3 FWHM), minus FLOOR_SIGMA sigma."""
    f = int(2 ** np.clip(round(math.log2(max(s.fwhm, 1.0) * 4.0 / 3.0)), 1, 4))
    h, w = tile.shape
    hb, wb = h // f, w // f
    small = cv2.resize(tile[: hb * f, : wb * f], (wb, hb), interpolation=cv2.INTER_AREA)
    med = cv2.medianBlur(small, 5)
    big = cv2.resize(med, (wb * f, hb * f), interpolation=cv2.INTER_LINEAR)
    if big.shape != tile.shape:
        big = cv2.copyMakeBorder(
            big, 0, h - big.shape[0], 0, w - big.shape[1], cv2.BORDER_REPLICATE
        )
    tiny = np.float32(1e-3 * s.sigma)
    return np.maximum(big - np.float32(FLOOR_SIGMA * s.sigma), tiny)


def _momentum(done: int) -> float:
    """Extrapolation factor after ``done`` iterations: ``(k - 1) / (k + 2)``, capped."""
    return min((done - 1) / (done + 2), ACCELERATION) if done >= 2 else 0.0


class _TileRun:
    """RL-TV on one tile of ``d - sky + pedestal``, one iteration at a time."""

    def __init__(self, tile: np.ndarray, otf: _Transfer, s: _Setup) -> None:
        self.s = s
        self.otf = otf
        self.done = 0
        self.stopped: str | None = None
        self.weight = _signal_mask(tile, s)
        m = s.margin
        if not (self.weight[m:-m, m:-m] > 0).any():
            self.stopped = "no signal"
            return
        self.tiny = np.float32(1e-3 * s.sigma)
        self.d = np.maximum(tile, self.tiny)
        self.floor = _floor(self.d, s)
        self.u = np.maximum(self.d, self.floor)
        self.previous = self.u.copy()
        mask = self.weight > 0.5
        self.mask = (mask if mask.any() else self.weight > 0).astype(np.float32)
        self.rows = np.zeros((3, tile.shape[1] + 1), np.float32)
        self.spectrum = np.empty(tile.shape, np.float32)
        self.model = np.empty(tile.shape, np.float32)  # K'u, then d / K'u, then K'^T of that

    def step(self) -> tuple[float, float]:
        """One accelerated RL-TV iteration; the sums of ``|change|`` and ``|signal|`` over
        the mask (0, 0 once the tile has stopped). ``u`` holds the extrapolated starting
        point, ``previous`` the estimate."""
        if self.stopped is not None:
            return 0.0, 0.0
        _convolve(self.u, self.otf, spectrum=self.spectrum, out=self.model)
        if not self.ratio():
            return 0.0, 0.0
        _convolve(self.model, self.otf, adjoint=True, spectrum=self.spectrum, out=self.model)
        return self.update()

    def ratio(self) -> bool:
        """``model`` (``K'u``) becomes ``d / K'u``; False if the tile stops here instead.

        The discrepancy principle: once K'u explains the data down to the noise, further
        iterations can only fit the noise. (Checked before the step, so a tile whose data is
        explained from the start is left as it is.)
        """
        s = self.s
        chi2 = _ratio(self.d, self.model, self.mask, self.tiny, np.float32(1.0 / s.sigma**2))
        if chi2 <= 1.0:
            self.stopped = "noise level"
            return False
        return True

    def update(self) -> tuple[float, float]:
        """The step from ``model`` holding the correction ``K'^T (d / K'u)``."""
        s = self.s
        change, base = _update(
            self.u,
            self.previous,
            self.model,
            self.floor,
            np.float32(s.lam),
            np.float32(s.sigma**2),
            np.float32(_momentum(self.done + 1)),
            self.mask,
            self.rows,
        )
        self.done += 1
        return change, base

    @property
    def members(self) -> tuple[_TileRun, ...]:
        return (self,)

    def change(self) -> np.ndarray | None:
        """What to add to the tile: deconvolved minus original, weighted by the signal mask."""
        if self.done == 0:
            return None
        self.previous -= self.d
        self.previous *= self.weight
        return self.previous


class _TilePair:
    """Two tiles with one real transfer function, stepped together: their convolutions share
    complex transforms (``_convolve_pair``). Either tile may stop first; the other goes on
    alone."""

    def __init__(self, a: _TileRun, b: _TileRun) -> None:
        self.a, self.b = a, b
        self.buffers: tuple[np.ndarray, np.ndarray] | None = None

    def step(self) -> tuple[float, float]:
        a, b = self.a, self.b
        if a.stopped is not None or b.stopped is not None:
            ca, ba = a.step()
            cb, bb = b.step()
            return ca + cb, ba + bb
        if self.buffers is None:
            shape = (*a.model.shape, 2)
            self.buffers = (np.empty(shape, np.float32), np.empty(shape, np.float32))
        _convolve_pair(a.u, b.u, a.otf, self.buffers, a.model, b.model)
        alive = [run for run in (a, b) if run.ratio()]
        if len(alive) == 2:
            _convolve_pair(a.model, b.model, a.otf, self.buffers, a.model, b.model)
        elif alive:  # the other stopped at the noise level: this one's correction alone
            run = alive[0]
            _convolve(run.model, run.otf, adjoint=True, spectrum=run.spectrum, out=run.model)
        sums = [run.update() for run in alive]
        return sum(c for c, _ in sums), sum(s for _, s in sums)

    @property
    def members(self) -> tuple[_TileRun, ...]:
        return (self.a, self.b)


def _steppers(runs: list[_TileRun]) -> list[_TileRun | _TilePair]:
    """Runs two by two where they share a real transfer function (one PSF for the image),
    else one by one (a field-varying PSF gives every tile its own)."""
    out: list[_TileRun | _TilePair] = []
    waiting: _TileRun | None = None
    for run in runs:
        if waiting is not None and run.otf is waiting.otf and run.otf.full is not None:
            out.append(_TilePair(waiting, run))
            waiting = None
        else:
            if waiting is not None:
                out.append(waiting)
            waiting = run
    if waiting is not None:
        out.append(waiting)
    return out


def _tiles(length: int, core: int) -> list[tuple[int, int, int]]:
    """Tile cores along one axis: (core start, first and last + 1 position it writes).

    The last core ends at the image's edge and writes only what the one before did not.
    """
    if length <= core:
        return [(0, 0, length)]
    starts = list(range(0, length - core, core))
    tiles = [(a, a, a + core) for a in starts]
    tiles.append((length - core, starts[-1] + core, length))
    return tiles


Crop = Callable[[int, int, int, int], np.ndarray]


def _extract(
    crop_of: Crop, shape: tuple[int, int], y0: int, x0: int, sy: int, sx: int
) -> np.ndarray:
    """Window ``[y0, y0 + sy) x [x0, x0 + sx)`` of an image of ``shape``, reflected where it
    leaves the image; ``crop_of(ya, yb, xa, xb)`` gives the part inside."""
    h, w = shape
    ya, yb = max(y0, 0), min(y0 + sy, h)
    xa, xb = max(x0, 0), min(x0 + sx, w)
    crop = crop_of(ya, yb, xa, xb)
    top, bottom, left, right = ya - y0, y0 + sy - yb, xa - x0, x0 + sx - xb
    if top or bottom or left or right:
        return np.ascontiguousarray(_reflect(crop, top, bottom, left, right), dtype=np.float32)
    return np.array(crop, dtype=np.float32)  # a copy: the caller works in it


def _reflect(crop: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Mirror padding that also works when a pad is wider than the crop (repeats the mirror)."""
    while top or bottom or left or right:
        h, w = crop.shape
        t, b = min(top, h - 1), min(bottom, h - 1)
        lft, r = min(left, w - 1), min(right, w - 1)
        if h == 1:
            t, b = top, bottom
        if w == 1:
            lft, r = left, right
        if h == 1 or w == 1:
            crop = np.pad(crop, ((t, b), (lft, r)), mode="edge")
        else:
            crop = cv2.copyMakeBorder(crop, t, b, lft, r, cv2.BORDER_REFLECT_101)
        top, bottom, left, right = top - t, bottom - b, left - lft, right - r
    return crop


def _target_fwhm(psf: PSFModel) -> float:
    """The target Gaussian's FWHM: TARGET_RATIO of the narrowest measured axis, sampled."""
    minor = [psf.fwhm * math.sqrt(max(1.0 - psf.ellipticity, 0.05))]
    for row in psf.cells or []:
        for cell in row:
            minor.append(cell["fwhm"] * math.sqrt(max(1.0 - cell["ellipticity"], 0.05)))
    return max(TARGET_RATIO * min(minor), MIN_TARGET_FWHM)


class _Kernels:
    """Effective kernels (measured PSF over the target) and their OTFs, per tile position."""

    def __init__(self, psf: PSFModel, shape: tuple[int, int]) -> None:
        self.shape = shape
        size = psf.kernel.shape[0]
        target = gaussian_kernel(size, _target_fwhm(psf))
        cells = [k for row in psf.grid for k in row] if psf.grid is not None else []
        found = effective_kernel(np.stack([psf.kernel, *cells]), target)
        self.single = found[0]
        self.grid = None
        if psf.grid is not None:
            n = len(psf.grid[0])
            self.grid = [list(found[1 + r * n : 1 + (r + 1) * n]) for r in range(len(psf.grid))]
        self._psf = PSFModel(
            kernel=self.single, fwhm=psf.fwhm, beta=psf.beta, n_stars=psf.n_stars, grid=self.grid
        )
        self._otf_cache: dict[tuple[int, int], _Transfer] = {}
        # Tiles start on two threads at once; with one kernel they must get the very same
        # transfer function (``_steppers`` pairs tiles by it).
        self._otf_lock = threading.Lock()

    def otf(self, cx: float, cy: float, tile_shape: tuple[int, int]) -> _Transfer:
        if self.grid is None:
            with self._otf_lock:
                cached = self._otf_cache.get(tile_shape)
                if cached is None:
                    cached = _otf(self.single, tile_shape, paired=True)
                    self._otf_cache[tile_shape] = cached
            return cached
        return _otf(self._psf.kernel_at(cx, cy, self.shape), tile_shape)


def _plane(
    plane: np.ndarray,
    kernels: _Kernels,
    sky: Crop | float,
    setup: _Setup,
    pool: ThreadPoolExecutor,
) -> tuple[np.ndarray, int, str, dict[str, int]]:
    """Deconvolve one plane tile by tile; ``sky`` is a constant or gives windows of a map.

    The iteration count is decided once for the whole plane: the ``PILOT`` tiles with the most
    compact signal run together until their summed change falls below the tolerance, and
    every other tile then runs as many iterations.
    """
    h, w = plane.shape
    m = setup.margin
    ty = min(TILE, sfft.next_fast_len(h + 2 * m, real=True))
    tx = min(TILE, sfft.next_fast_len(w + 2 * m, real=True))
    cy, cx = ty - 2 * m, tx - 2 * m
    out = plane.copy()
    Pos = tuple[tuple[int, int, int], tuple[int, int, int]]
    jobs: list[Pos] = [(a, b) for a in _tiles(h, cy) for b in _tiles(w, cx)]

    def pixels(ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
        return plane[ya:yb, xa:xb]

    def start(pos: Pos) -> _TileRun:
        (y0, _, _), (x0, _, _) = pos
        tile = _extract(pixels, (h, w), y0 - m, x0 - m, ty, tx)
        if callable(sky):
            tile -= _extract(sky, (h, w), y0 - m, x0 - m, ty, tx)
            tile += np.float32(setup.pedestal)
        else:
            tile += np.float32(setup.pedestal - sky)
        return _TileRun(tile, kernels.otf(x0 + cx / 2.0, y0 + cy / 2.0, (ty, tx)), setup)

    def finish(pos: Pos, run: _TileRun) -> str:
        change = run.change()
        if change is not None:
            # Tiles write disjoint parts of the image, so the threads never meet.
            (y0, ya, yb), (x0, xa, xb) = pos
            out[ya:yb, xa:xb] += change[m + ya - y0 : m + yb - y0, m + xa - x0 : m + xb - x0]
        return run.stopped or reason

    # The pilot: the tiles with the most signal, stepped together.
    order = sorted(range(len(jobs)), key=lambda i: -_signal_score(plane, sky, jobs[i], setup))
    pilot = order[:PILOT]
    runs = dict(zip(pilot, pool.map(start, [jobs[i] for i in pilot]), strict=True))
    steppers = _steppers(list(runs.values()))
    reason, iterations = "max_iterations", setup.max_iterations
    for k in range(1, setup.max_iterations + 1):
        sums = list(pool.map(lambda stepper: stepper.step(), steppers))
        change, base = sum(c for c, _ in sums), sum(b for _, b in sums)
        if all(r.stopped is not None for r in runs.values()):
            reason, iterations = next(iter(runs.values())).stopped or reason, k - 1
            if any(r.stopped == "noise level" for r in runs.values()):
                reason = "noise level"
            break
        if change <= setup.tolerance * max(base, 1e-30):
            reason, iterations = "converged", k
            break
    whys = [finish(jobs[i], run) for i, run in runs.items()]

    def rest(group: list[int]) -> list[str]:
        runs = [start(jobs[i]) for i in group]
        for stepper in _steppers(runs):
            # Paired tiles step together: while both run, both have done as many iterations.
            while any(r.stopped is None and r.done < iterations for r in stepper.members):
                stepper.step()
        return [finish(jobs[i], run) for i, run in zip(group, runs, strict=True)]

    later = order[PILOT:]
    for group in pool.map(rest, [later[i : i + 2] for i in range(0, len(later), 2)]):
        whys += group
    counts: dict[str, int] = {}
    for why in whys:
        counts[why] = counts.get(why, 0) + 1
    return out, iterations, reason, counts


def _signal_score(plane: np.ndarray, sky: Crop | float, pos: tuple, setup: _Setup) -> float:
    """How much compact signal (stars, not nebula) a tile's core holds: the sum of what lies
    5 sigma over a local median of about five FWHM, on a copy binned 2x2."""
    (_, ya, yb), (_, xa, xb) = pos
    core = plane[ya:yb, xa:xb]
    hb, wb = core.shape[0] // 2, core.shape[1] // 2
    if hb < 3 or wb < 3:
        return 0.0
    small = cv2.resize(core[: 2 * hb, : 2 * wb], (wb, hb), interpolation=cv2.INTER_AREA)
    k = max(3, 2 * round(1.25 * setup.fwhm) + 1)
    local = cv2.medianBlur(small, 5) if k <= 5 else cv2.blur(small, (k, k))
    excess = small - local - np.float32(5.0 * setup.sigma / 2.0)
    return float(np.sum(excess[excess > 0], dtype=np.float64))


def deconvolve(
    image: np.ndarray,
    psf: PSFModel,
    *,
    max_iterations: int = 30,
    regularization: float = 0.002,
    noise: float | None = None,
    background: np.ndarray | float | None = None,
    tolerance: float = TOLERANCE,
) -> Deconvolved:
    """Deconvolve a linear image (ADU) with a measured PSF; linear in, linear out.

    Colour images (H, W, 3) are deconvolved channel by channel with the same PSF. ``noise``
    is the sky's per-pixel noise (ADU) and ``background`` the sky model (an image of the same
    height and width, per channel for colour, or a constant); both are estimated when
    ``None``. ``regularization`` is the total-variation weight (0 turns it off).
    """
    start = time.perf_counter()
    if image.ndim not in (2, 3):
        raise ValueError("deconvolve expects (H, W) or (H, W, C)")
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    img = np.asarray(image, np.float32)
    planes = [img] if img.ndim == 2 else [img[:, :, c] for c in range(img.shape[2])]
    kernels = _Kernels(psf, img.shape[:2])
    margin = max(MARGIN, psf.kernel.shape[0] // 2 + 12, math.ceil(4.0 * psf.fwhm) + 4)
    outs: list[np.ndarray] = []
    iterations: list[int] = []
    reasons: list[str] = []
    counts: dict[str, int] = {}
    with ThreadPoolExecutor(THREADS) as pool:
        for c, plane in enumerate(planes):
            plane = np.ascontiguousarray(plane)
            finite = np.isfinite(plane)
            fill = None
            if not finite.all():
                fill = float(np.median(plane[finite])) if finite.any() else 0.0
                plane = np.where(finite, plane, np.float32(fill))
            sky, sigma = _sky(plane, background, c, noise)
            setup = _Setup(
                sigma=sigma,
                pedestal=PEDESTAL * sigma,
                fwhm=psf.fwhm,
                lam=regularization,
                max_iterations=max_iterations,
                tolerance=tolerance,
                margin=margin,
            )
            out, n, why, tiles = _plane(plane, kernels, sky, setup, pool)
            if fill is not None:
                out[~finite] = np.nan
            outs.append(out)
            iterations.append(n)
            reasons.append(why)
            for key, count in tiles.items():
                counts[key] = counts.get(key, 0) + count
    return Deconvolved(
        image=outs[0] if img.ndim == 2 else np.stack(outs, axis=2),
        iterations=max(iterations),
        stopped=", ".join(dict.fromkeys(reasons)),
        seconds=time.perf_counter() - start,
        tiles=counts,
    )


def _sky(
    plane: np.ndarray, background: np.ndarray | float | None, channel: int, noise: float | None
) -> tuple[Crop | float, float]:
    """The sky under ``plane`` (a constant, or windows of a map) and its per-pixel noise.

    An estimated sky is kept on a grid binned by ``SKY_BINNING`` and enlarged window by window
    (bilinear), so no full-size map is ever made: the sky is smooth on that scale.
    """
    sky: Crop | float
    bkg = None
    if background is None:
        bkg = estimate_background(plane)
        coarse = bkg.grid(plane.shape, SKY_BINNING, "level", cv2.INTER_CUBIC)
        f = SKY_BINNING

        def sky(ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
            # Binned pixel i is centred on full-resolution f i + (f - 1) / 2.
            m = np.array(
                [[1 / f, 0, (xa - (f - 1) / 2) / f], [0, 1 / f, (ya - (f - 1) / 2) / f]],
                np.float64,
            )
            return cv2.warpAffine(
                coarse,
                m,
                (xb - xa, yb - ya),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )

    elif np.ndim(background) == 0:
        sky = float(background)
    else:
        arr = np.asarray(background, np.float32)
        full = arr[:, :, channel] if arr.ndim == 3 else arr
        if full.shape != plane.shape:
            raise ValueError("background must have the image's height and width")

        def sky(ya: int, yb: int, xa: int, xb: int) -> np.ndarray:
            return full[ya:yb, xa:xb]

    if noise is None:
        if bkg is None:
            bkg = estimate_background(plane)
        sigma = float(bkg.noise)
    else:
        sigma = float(noise)
    if not (math.isfinite(sigma) and sigma > 0):
        sigma = max(float(np.std(plane)), 1e-6)
    return sky, sigma
