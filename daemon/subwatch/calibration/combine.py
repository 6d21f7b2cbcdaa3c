"""Integrating calibration frames into masters: a sigma-clipped mean, a few rows at a time.

A master must reject the odd cosmic ray or satellite in a dark or flat without the noise penalty
of a median (a median of N frames is about 25% noisier than a mean). For each pixel the N values
are put in order; their median is the centre, and the spread comes from two inner order
statistics divided by the gap normal order statistics are expected to have (Blom's
approximation), so it is unbiased for clean pixels and barely moved by one wild value. Values
beyond ``kappa`` spreads are dropped and the rest averaged.

Ordering N values per pixel is done with a fixed sorting network: a list of compare-and-swap
steps, each one ``np.minimum``/``np.maximum`` over a whole block of pixels, in float32, in
place. For the 5-30 frames of a typical master that is several times faster than ``np.sort``
along the frame axis. Frames are read a block of rows at a time, straight from their files
where the format allows, so memory stays a few megabytes per worker whatever the number of
frames and the sensor size; blocks are sized to stay in the processor's cache, and two or more
workers take alternate blocks (numpy releases the interpreter lock inside each step).

A spread estimated from a handful of frames is itself noisy, and integer sensors often give a
zero spread, so each pixel's spread is floored at half the typical spread over the frame:
never clip everything, never clip nothing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.stats import norm

from subwatch.frames import FrameReadError, read_frame

# Bytes of one block of rows for all frames: small enough to stay in the cache with its
# scratch planes, large enough that the per-step overhead and the threads' turns are amortised.
BLOCK_BYTES = 4 * 1024 * 1024
# Beyond this many frames a sorting network has too many steps; np.sort takes over.
NETWORK_MAX = 128


@lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-and-swap pairs (i < j) that sort any ``n`` values: Batcher's odd-even merge.

    Built for the next power of two and pruned of pairs that touch a missing element, which
    still sorts ``n`` values (missing elements act as +infinity at the end).
    """
    pairs: list[tuple[int, int]] = []
    size = 1
    while size < n:
        size *= 2
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def sort_planes(planes: list[np.ndarray], scratch: np.ndarray) -> np.ndarray:
    """Sort same-shaped arrays element-wise in place; ``planes[i]`` becomes the i-th smallest.

    Views are swapped rather than copied, so the list is reordered; the returned array is the
    spare buffer left over (one of the inputs or ``scratch``).
    """
    n = len(planes)
    if n > NETWORK_MAX:
        ordered = np.sort(np.stack(planes), axis=0)
        for i in range(n):
            planes[i][...] = ordered[i]
        return scratch
    for a, b in sorting_network(n):
        np.minimum(planes[a], planes[b], out=scratch)
        np.maximum(planes[a], planes[b], out=planes[b])
        planes[a], scratch = scratch, planes[a]
    return scratch


# -- frames read a block of rows at a time ----------------------------------------------------


class FrameSource:
    """One frame, of which ``read(r0, r1, out)`` fills rows ``r0:r1`` (float32) on demand."""

    shape: tuple[int, ...]
    name: str = ""

    def read(self, r0: int, r1: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds open (a file); reading again reopens it."""


class ArraySource(FrameSource):
    """A frame already in memory."""

    def __init__(self, data: np.ndarray, name: str = "") -> None:
        self.data = data
        self.shape = tuple(data.shape)
        self.name = name

    def read(self, r0: int, r1: int, out: np.ndarray) -> None:
        out[...] = self.data[r0:r1]


_FITS_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", -32: ">f4", -64: ">f8"}


class FitsRowSource(FrameSource):
    """Rows of an uncompressed FITS primary image, read from the file when asked for.

    BZERO and BSCALE are applied, NaN and Inf become the block's median (as ``read_frame``
    does for whole frames), and nothing but the asked-for rows is ever in memory.
    """

    def __init__(self, path: Path, header: fits.Header, offset: int) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.bitpix = int(header["BITPIX"])
        self.dtype = np.dtype(_FITS_DTYPES[self.bitpix])
        self.bzero = float(header.get("BZERO", 0.0))
        self.bscale = float(header.get("BSCALE", 1.0))
        self.shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        self.offset = offset
        self._fd: int | None = None

    def read(self, r0: int, r1: int, out: np.ndarray) -> None:
        width = self.shape[1]
        count = (r1 - r0) * width
        nbytes = count * self.dtype.itemsize
        start = self.offset + r0 * width * self.dtype.itemsize
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, nbytes, start)  # no shared file position: thread-safe
        if len(raw) != nbytes:
            raise FrameReadError("incomplete", f"{self.path.name}: rows {r0}-{r1} missing")
        values = np.frombuffer(raw, dtype=self.dtype, count=count).reshape(r1 - r0, width)
        if self.bscale != 1.0:
            np.multiply(values, np.float32(self.bscale), out=out, casting="unsafe")
            if self.bzero:
                out += np.float32(self.bzero)
        elif self.bzero:
            np.add(values, np.float32(self.bzero), out=out, casting="unsafe")
        else:
            out[...] = values
        if self.bitpix < 0:
            finite = np.isfinite(out)
            if not finite.all():
                out[~finite] = np.median(out[finite]) if finite.any() else 0.0

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class AdjustedSource(FrameSource):
    """``(source - floor) * scale``: a flat with its bias or dark-flat removed, normalised."""

    def __init__(
        self, source: FrameSource, floor: np.ndarray | None = None, scale: float = 1.0
    ) -> None:
        self.source = source
        self.shape = source.shape
        self.name = source.name
        self.floor = floor
        self.scale = np.float32(scale)

    def close(self) -> None:
        self.source.close()

    def read(self, r0: int, r1: int, out: np.ndarray) -> None:
        self.source.read(r0, r1, out)
        if self.floor is not None:
            out -= self.floor[r0:r1]
        if self.scale != 1.0:
            out *= self.scale


def open_source(path: Path, *, max_dimension: int = 20000) -> FrameSource:
    """A row source for a calibration frame; uncompressed 2D FITS is read lazily.

    Anything else (compressed FITS, XISF, TIFF, colour frames) is read whole by ``read_frame``
    and served from memory. Raises ``FrameReadError`` for a frame that cannot be used.
    """
    path = Path(path)
    lazy = _lazy_fits(path, max_dimension)
    if lazy is not None:
        return lazy
    frame = read_frame(path, max_dimension=max_dimension)
    return ArraySource(frame.data, path.name)


def _lazy_fits(path: Path, max_dimension: int) -> FitsRowSource | None:
    if not path.name.lower().endswith((".fits", ".fit", ".fts")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                header = hdul[0].header
                offset = int(hdul.fileinfo(0)["datLoc"])
                size = path.stat().st_size
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None  # let read_frame say what is wrong
    if (
        header.get("NAXIS") != 2
        or header.get("BITPIX") not in _FITS_DTYPES
        or "BLANK" in header
        or not isinstance(header.get("NAXIS1"), int)
        or not isinstance(header.get("NAXIS2"), int)
    ):
        return None
    try:
        source = FitsRowSource(path, header, offset)
    except (TypeError, ValueError):
        return None
    h, w = source.shape
    if not (8 <= w <= max_dimension and 8 <= h <= max_dimension):
        return None  # read_frame refuses it with the right reason
    if size < offset + h * w * source.dtype.itemsize:
        return None
    return source


# -- the combination ---------------------------------------------------------------------------


def _spread_ranks(n: int) -> tuple[int, int, float]:
    """Inner order statistics used for the spread and their expected gap for unit sigma."""
    lo = max(0, round(0.25 * (n - 1)))
    hi = min(n - 1, n - 1 - lo)
    expected = norm.ppf((np.array([lo, hi]) + 1 - 0.375) / (n + 0.25))
    return lo, hi, float(expected[1] - expected[0])


def _as_sources(frames: Sequence[np.ndarray | FrameSource]) -> list[FrameSource]:
    sources = [f if isinstance(f, FrameSource) else ArraySource(np.asarray(f)) for f in frames]
    if not sources:
        raise ValueError("no frames to combine")
    shape = sources[0].shape
    if any(s.shape != shape for s in sources):
        raise ValueError("frames to combine differ in size")
    return sources


def _row_bytes(sources: list[FrameSource]) -> int:
    shape = sources[0].shape
    return int(np.prod(shape[1:])) * 4 * len(sources)


def sigma_clipped_mean(
    frames: Sequence[np.ndarray | FrameSource],
    kappa: float = 3.0,
    *,
    block_rows: int | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Per-pixel mean of ``frames`` after dropping values beyond ``kappa`` robust sigma.

    ``frames`` are arrays or ``FrameSource`` objects of one shape ((H, W) or (H, W, C)); the
    result is float32 of that shape. With fewer than three frames nothing can be told apart
    and the plain mean is returned; with exactly three, one wild value would inflate any
    per-pixel spread, so the frame's typical spread is used for every pixel.
    """
    sources = _as_sources(frames)
    n = len(sources)
    shape = sources[0].shape
    height = shape[0]
    out = np.empty(shape, np.float32)
    if block_rows is None:
        block_rows = max(1, min(height, BLOCK_BYTES // max(1, _row_bytes(sources))))
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    starts = list(range(0, height, block_rows))
    workers = max(1, min(workers, len(starts)))

    if n < 3:

        def mean_block(r0: int, cube: np.ndarray, scratch: np.ndarray) -> None:
            r1 = min(height, r0 + block_rows)
            m = r1 - r0
            for i, src in enumerate(sources):
                src.read(r0, r1, cube[i, :m])
            np.mean(cube[:, :m], axis=0, out=out[r0:r1])

        _run_blocks(mean_block, starts, workers, n, block_rows, shape)
        return out

    lo, hi, gap = _spread_ranks(n)
    typical = _typical_spread(sources, lo, hi, gap, block_rows)
    floor = max(0.5 * typical, float(np.finfo(np.float32).tiny))
    # Three values have no inner pair that one wild value cannot move: their spread is the
    # frame's typical one.
    per_pixel = n > 3
    # Order statistics between lo and hi lie within ``gap`` spreads of the median, so with
    # kappa >= gap they are always kept and only the outer ones need testing.
    tested = kappa < gap or not per_pixel
    outer = list(range(n)) if tested else [i for i in range(n) if i < lo or i > hi]
    inner = [i for i in range(n) if i not in outer]
    mid_lo, mid_hi = (n - 1) // 2, n // 2

    def clip_block(r0: int, cube: np.ndarray, scratch: np.ndarray) -> None:
        r1 = min(height, r0 + block_rows)
        m = r1 - r0
        planes = [cube[i, :m] for i in range(n)]
        for i, src in enumerate(sources):
            src.read(r0, r1, planes[i])
        spare = sort_planes(planes, scratch[0, :m])
        low, high = scratch[1, :m], scratch[2, :m]
        total, count, keep = scratch[3, :m], scratch[4, :m], scratch[5, :m]
        if per_pixel:
            np.subtract(planes[hi], planes[lo], out=high)
            high *= np.float32(kappa / gap)
            np.maximum(high, np.float32(kappa * floor), out=high)
        else:
            high[...] = np.float32(kappa * max(typical, floor))
        # low = centre - reach, high = centre + reach, centre the median
        np.add(planes[mid_lo], planes[mid_hi], out=low)
        low *= np.float32(0.5)
        np.subtract(low, high, out=spare)
        np.add(low, high, out=high)
        low, spare = spare, low
        total[...] = 0.0
        for i in inner:
            total += planes[i]
        count[...] = len(inner)
        # The values are sorted, so those below the median can only fall off the low side
        # and those above only off the high side: one comparison each, as a 0/1 weight.
        for i in outer:
            if i <= mid_lo:
                np.greater_equal(planes[i], low, out=keep)
            else:
                np.less_equal(planes[i], high, out=keep)
            np.multiply(planes[i], keep, out=spare)
            total += spare
            count += keep
        if not tested:
            np.divide(total, count, out=out[r0:r1])
            return
        # Only a kappa below the inner spread can drop every value: then the median stands.
        np.divide(total, count, out=out[r0:r1], where=count > 0)
        empty = count == 0
        if empty.any():
            out[r0:r1][empty] = (0.5 * (planes[mid_lo] + planes[mid_hi]))[empty]

    _run_blocks(clip_block, starts, workers, n, block_rows, shape, scratch_planes=6)
    return out


def _run_blocks(
    work: Callable[[int, np.ndarray, np.ndarray], None],
    starts: list[int],
    workers: int,
    n: int,
    block_rows: int,
    shape: tuple[int, ...],
    scratch_planes: int = 1,
) -> None:
    """Give each worker its own buffers and every ``workers``-th block."""

    def worker(index: int) -> None:
        cube = np.empty((n, block_rows, *shape[1:]), np.float32)
        scratch = np.empty((scratch_planes, block_rows, *shape[1:]), np.float32)
        for r0 in starts[index::workers]:
            work(r0, cube, scratch)

    if workers == 1:
        worker(0)
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(worker, i) for i in range(workers)]:
            future.result()


def _typical_spread(
    sources: list[FrameSource], lo: int, hi: int, gap: float, block_rows: int
) -> float:
    """Median per-pixel spread over a few blocks spread down the frame (0 for noiseless data)."""
    n = len(sources)
    height = sources[0].shape[0]
    rows = max(1, min(block_rows, 16))
    picks = sorted({int(x) for x in np.linspace(0, max(0, height - rows), 8)})
    cube = np.empty((n, rows, *sources[0].shape[1:]), np.float32)
    scratch = np.empty_like(cube[0])
    spreads = []
    for r0 in picks:
        r1 = min(height, r0 + rows)
        planes = [cube[i, : r1 - r0] for i in range(n)]
        for i, src in enumerate(sources):
            src.read(r0, r1, planes[i])
        sort_planes(planes, scratch[: r1 - r0])
        spreads.append(((planes[hi] - planes[lo]) / gap).ravel())
    return float(np.median(np.concatenate(spreads)))


def frame_level(source: FrameSource, floor: np.ndarray | None = None) -> float:
    """Median of the central half of a frame (after removing ``floor``), read sparsely.

    Used to bring flats of different brightness (dawn sky flats brighten by the minute) to one
    level before they are combined; eight bands of rows are enough for a median.
    """
    height, width = source.shape[0], source.shape[1]
    rows = max(1, min(8, height // 16))
    y0, y1 = height // 4, max(height // 4 + rows, 3 * height // 4)
    x0, x1 = width // 4, max(width // 4 + 1, 3 * width // 4)
    samples = []
    buf = np.empty((rows, *source.shape[1:]), np.float32)
    for r0 in sorted({int(x) for x in np.linspace(y0, y1 - rows, 8)}):
        r1 = min(height, r0 + rows)
        part = buf[: r1 - r0]
        source.read(r0, r1, part)
        if floor is not None:
            part -= floor[r0:r1]
        samples.append(part[:, x0:x1].ravel())
    return float(np.median(np.concatenate(samples)))
