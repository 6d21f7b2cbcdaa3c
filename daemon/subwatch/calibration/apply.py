"""Calibration steps, each usable on its own, in the order a light goes through them.

All values are ADU, all images float32 (H, W) in the sensor's own pixel grid (a colour sensor's
mosaic before debayering), and each step works in place on the light where it can, since a
26 MP frame is 100 MB and the night goes on.

1. ``dark_subtrahend`` / ``subtract_dark``: the bias pedestal and the dark current leave in one
   subtraction. When the master dark's exposure differs from the light's, only the thermal part
   ``dark - bias`` scales with time, so the bias must be known to scale a dark.
2. ``normalise_flat`` and ``flat_correct``: the flat (its own bias or dark-flat removed) is
   scaled to a median of one over the centre of the frame, so the light keeps its ADU scale.
   On a colour sensor each of the four mosaic colours is scaled on its own: the flat then
   corrects vignetting and dust only, and the light keeps the colour balance it was taken with
   rather than the colour of the flat panel or the dawn sky.
3. Cosmetic correction. ``find_dark_defects`` lists hot pixels (dark current far above the
   pixels around them) and cold ones (far below) in a master dark; ``find_dead_pixels`` lists
   flat pixels under half of their neighbours' response. Without a dark, ``find_outlier_pixels``
   finds isolated spikes in the light itself. ``correct_pixels`` replaces the listed pixels by
   the median of their eight same-colour neighbours: on a colour sensor the neighbours one
   pixel away are of another colour, so they are taken two pixels away.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from subwatch.calibration.combine import sort_planes
from subwatch.rowbands import for_row_bands

# At most this fraction of the pixels is repaired from a dark. An uncooled sensor in summer can
# have several percent of pixels with measurable excess current; dark subtraction removes their
# mean, and repairing them all would cost more resolution than it saves. The worst ones are kept.
MAX_DEFECT_FRACTION = 0.01
# A flat pixel is dead or under a deep speck below this fraction of its neighbours.
DEAD_FRACTION = 0.5
# Normalised flat values are clamped here before dividing, so a dead pixel (repaired later by
# the cosmetic step) does not turn into a hundred-fold spike.
FLAT_FLOOR = 0.05


def subtract_bias(light: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``light - bias`` (new array); the bias pedestal and its fixed pattern, in ADU."""
    return light - bias


def dark_subtrahend(
    dark: np.ndarray, bias: np.ndarray | None = None, scale: float | None = None
) -> np.ndarray:
    """What to subtract from a light: the dark, or ``bias + scale * (dark - bias)``.

    ``scale`` is light exposure / dark exposure; the thermal signal is linear in time, the
    bias pedestal is not, hence the bias is needed to scale (without it the dark is used as is).
    """
    if scale is None or bias is None or scale == 1.0:
        return dark
    out = np.subtract(dark, bias, dtype=np.float32)
    out *= np.float32(scale)
    out += bias
    return out


def subtract_dark(
    light: np.ndarray,
    dark: np.ndarray,
    *,
    light_exptime: float | None = None,
    dark_exptime: float | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Remove bias and dark current (new array); scale the thermal part when exposures differ.

    Exposures in seconds; scaling happens only when both are known, differ and the bias is given.
    """
    scale = None
    if bias is not None and light_exptime and dark_exptime and light_exptime != dark_exptime:
        scale = light_exptime / dark_exptime
    return light - dark_subtrahend(dark, bias, scale)


def cfa_planes(shape: tuple[int, ...], cfa: bool) -> list[tuple[slice, slice]]:
    """Slices of the four mosaic colours of a colour sensor, or the whole frame."""
    if not cfa:
        return [(slice(None), slice(None))]
    return [(slice(dy, None, 2), slice(dx, None, 2)) for dy in (0, 1) for dx in (0, 1)]


def normalise_flat(flat: np.ndarray, cfa: bool = False) -> np.ndarray:
    """Scale a bias- or dark-flat-subtracted flat to a median of one over the central half.

    With ``cfa`` each mosaic colour gets its own median (see the module notes). Values are
    clamped at ``FLAT_FLOOR``: a pixel at a few percent of the median is dead or under a deep
    dust speck, and dividing by it would amplify noise a hundred-fold.
    """
    norm = np.empty(flat.shape, np.float32)
    for rows, cols in cfa_planes(flat.shape, cfa):
        plane = flat[rows, cols]
        ph, pw = plane.shape[:2]
        centre = plane[ph // 4 : 3 * ph // 4, pw // 4 : 3 * pw // 4]
        level = float(np.median(centre))
        if not np.isfinite(level) or level <= 0:
            raise ValueError("flat has no positive signal")
        norm[rows, cols] = plane / np.float32(level)
    np.maximum(norm, np.float32(FLAT_FLOOR), out=norm)
    return norm


def flat_correct(light: np.ndarray, flat_norm: np.ndarray) -> np.ndarray:
    """``light / flat_norm`` (new array): vignetting and dust divided out, ADU scale kept."""
    return light / flat_norm


def subtract_and_flatten(
    light: np.ndarray, subtrahend: np.ndarray | None, flat_norm: np.ndarray | None
) -> np.ndarray:
    """``(light - subtrahend) / flat_norm`` as a new float32 array; either master may be None.

    Steps 1 and 2 in one pass, band by band on all cores: the values of the separate steps bit
    for bit, 0.018 against 0.022 s for a 26 MP sub measured in one process (the pass is bound
    by memory; no full-size temporary is made). A mono master serves every channel of a
    channel-last light.
    """
    out = np.empty(light.shape, np.float32)

    def fit(master: np.ndarray | None) -> np.ndarray | None:
        if master is not None and master.ndim == 2 and light.ndim == 3:
            return master[:, :, None]
        return master

    sub, flat = fit(subtrahend), fit(flat_norm)

    def band(rows: slice) -> None:
        if sub is not None:
            np.subtract(light[rows], sub[rows], out=out[rows], dtype=np.float32)
        else:
            out[rows] = light[rows]
        if flat is not None:
            np.divide(out[rows], flat[rows], out=out[rows])

    for_row_bands(band, light.shape[0], out[0].nbytes)
    return out


# -- finding defects -------------------------------------------------------------------------


def _local_median(image: np.ndarray, cfa: bool) -> np.ndarray:
    """5x5 median of same-colour pixels (the pixel included), float32, image-sized."""
    out = np.empty(image.shape, np.float32)
    for rows, cols in cfa_planes(image.shape, cfa):
        plane = np.ascontiguousarray(image[rows, cols], dtype=np.float32)
        out[rows, cols] = cv2.medianBlur(plane, 5)
    return out


def find_dark_defects(
    dark: np.ndarray,
    sigma: float = 5.0,
    cfa: bool = False,
    max_fraction: float = MAX_DEFECT_FRACTION,
) -> np.ndarray:
    """(n, 2) rows/cols of hot and cold pixels in a master dark (or dark current).

    A pixel is hot when it stands ``sigma`` robust sigmas above the median of its 5x5
    same-colour neighbourhood, cold when it stands as far below. Comparing with the
    neighbourhood rather than the whole frame keeps amplifier glow and gradients out of the list.
    The bias pedestal is a constant here, so a master dark and a dark current give the same list.
    If more than ``max_fraction`` of the pixels qualify, only that many of the worst are listed.
    """
    dark = np.asarray(dark, np.float32)
    excess = dark - _local_median(dark, cfa)
    sample = excess[::3, ::3]
    med = float(np.median(sample))
    noise = max(1.4826 * float(np.median(np.abs(sample - med))), 1e-3)
    np.subtract(excess, np.float32(med), out=excess)
    np.abs(excess, out=excess)
    threshold = sigma * noise
    limit = int(max_fraction * excess.size)
    if limit < excess.size and np.count_nonzero(excess > threshold) > limit:
        flat = excess.ravel()
        threshold = max(threshold, float(np.partition(flat, flat.size - limit - 1)[-limit - 1]))
    return np.argwhere(excess > threshold)


def find_dead_pixels(
    flat_norm: np.ndarray, fraction: float = DEAD_FRACTION, cfa: bool = False
) -> np.ndarray:
    """(n, 2) rows/cols of flat pixels below ``fraction`` of their same-colour neighbours.

    Dust donuts dim a patch by some ten or twenty percent and the 5x5 median follows them; a
    pixel at half its neighbours' response is dead or nearly so.
    """
    flat = np.asarray(flat_norm, np.float32)
    local = _local_median(flat, cfa)
    return np.argwhere(flat < np.float32(fraction) * local)


_SCREEN_ROWS = 32


def find_outlier_pixels(
    image: np.ndarray, sigma: float = 8.0, cfa: bool = False, workers: int = 2
) -> np.ndarray:
    """Without a dark: (n, 2) rows/cols of isolated pixels far above their neighbours.

    A star's core is at most a few times brighter than the pixels next to it (the optics
    spread light over several pixels); a hot pixel or a cosmic-ray hit stands alone. A pixel is
    an outlier when it exceeds its local level (the median of its 5x5 same-colour
    neighbourhood) by ``sigma`` noise *and* by three times what its brightest same-colour
    neighbour does.

    A median over the whole frame is slow, and unnecessary: such a pixel must also stand above
    its brightest neighbour by two thirds of that margin, so above its left and right ones,
    which one pass over bands of rows small enough to stay in the cache finds. Only the few
    pixels that pass (star cores, trails and defects) get the exact test. On a mosaic the
    same-colour neighbours are two pixels away, too far to tell a small star from a spike, so
    there a pixel must also stand six times higher than any of its eight adjacent
    (other-colour) pixels, each measured against the level of its own colour: starlight
    reaches them, a defect's charge does not.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2, dtype=np.float32)
    img = np.ascontiguousarray(img)
    noise = _pixel_noise(img, 2 if cfa else 1)
    candidates = _screen(img, 2 if cfa else 1, (2.0 / 3.0) * sigma * noise, workers)
    if len(candidates) == 0:
        return candidates
    return _confirm(img, candidates, sigma * noise, cfa)


def _pixel_noise(img: np.ndarray, step: int) -> float:
    """Per-pixel noise (ADU) from differences of same-colour neighbours on sampled rows."""
    h = img.shape[0]
    rows = img[:: max(1, h // 16)]
    diff = np.abs(rows[:, step:] - rows[:, :-step])[:, :: 2 * step]
    return max(1.4826 * float(np.median(diff)) / np.sqrt(2.0), 1e-3)


def _screen(img: np.ndarray, step: int, margin: float, workers: int) -> np.ndarray:
    """(n, 2) rows/cols of pixels above both same-colour horizontal neighbours by ``margin``.

    Done a band of rows at a time, each worker with its own buffers (a fresh array per band
    would cost a page fault per 4 kB). The hits are few, so they are looked for four mask bytes
    at a time.
    """
    h, w = img.shape
    margin32 = float(np.float32(margin))
    starts = list(range(0, h, _SCREEN_ROWS))
    workers = max(1, min(workers, len(starts)))

    def run(index: int) -> list[np.ndarray]:
        rise = np.empty((_SCREEN_ROWS, w), np.float32)
        hits = np.zeros(-(-_SCREEN_ROWS * w // 4) * 4, np.uint8)
        found = []
        for r0 in starts[index::workers]:
            r1 = min(h, r0 + _SCREEN_ROWS)
            size = (r1 - r0) * w
            band, up, mask = img[r0:r1], rise[: r1 - r0], hits[:size].reshape(r1 - r0, w)
            # The brighter of the two neighbours; at the frame's edges, the one there is.
            np.maximum(band[:, : -2 * step], band[:, 2 * step :], out=up[:, step:-step])
            up[:, :step] = band[:, step : 2 * step]
            up[:, -step:] = band[:, -2 * step : -step]
            cv2.subtract(band, up, dst=up)
            cv2.compare(up, margin32, cv2.CMP_GT, dst=mask)
            if not cv2.countNonZero(mask):
                continue
            hits[size:] = 0
            words = cv2.findNonZero(hits.view(np.int32).reshape(1, -1)).reshape(-1, 2)[:, 0]
            word, byte = np.nonzero(hits.reshape(-1, 4)[words])
            flat = words[word] * 4 + byte
            found.append(np.column_stack([flat // w + r0, flat % w]))
        return found

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = [p for part in pool.map(run, range(workers)) for p in part]
    else:
        parts = run(0)
    return np.concatenate(parts).astype(np.intp) if parts else np.zeros((0, 2), np.intp)


def _gather(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Values at (rows + dy, cols + dx); beyond an edge, the opposite neighbour (rows - dy).

    The opposite neighbour is of the same colour on a mosaic and never the pixel itself, which
    a mirror about the edge could be.
    """
    h, w = img.shape[:2]
    r, c = rows + dy, cols + dx
    r = np.clip(np.where((r < 0) | (r > h - 1), rows - dy, r), 0, h - 1)
    c = np.clip(np.where((c < 0) | (c > w - 1), cols - dx, c), 0, w - 1)
    return img[r, c]


def _take(
    img: np.ndarray, rows: np.ndarray, cols: np.ndarray, offsets: list[tuple[int, int]]
) -> np.ndarray:
    """(len(offsets), n) values at each (dy, dx) from each pixel; see ``_gather`` at edges.

    Pixels away from the edges (nearly all) are read in one indexing step on the flat image.
    """
    h, w = img.shape[:2]
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    out = np.empty((len(offsets), len(rows)), img.dtype)
    inside = (rows >= reach) & (rows < h - reach) & (cols >= reach) & (cols < w - reach)
    if img.ndim == 2 and img.flags.c_contiguous:
        flat = (rows[inside] * w + cols[inside]).astype(np.intp)
        step = np.array([dy * w + dx for dy, dx in offsets], np.intp)
        out[:, inside] = img.reshape(-1)[flat[:, None] + step[None, :]].T
        edge = ~inside
    else:
        edge = np.ones(len(rows), bool)
    if edge.any():
        r, c = rows[edge], cols[edge]
        for k, (dy, dx) in enumerate(offsets):
            out[k, edge] = _gather(img, r, c, dy, dx)
    return out


_WINDOW = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
_RING_AT = [i for i, (dy, dx) in enumerate(_WINDOW) if max(abs(dy), abs(dx)) == 1]
_BORDER7 = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4) if max(abs(dy), abs(dx)) == 3]
_ADJACENT = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _median_rows(values: np.ndarray) -> np.ndarray:
    """Median down the first axis of a (k, n) array; sorting each short row is fastest."""
    ordered = np.sort(values.T, axis=1)
    k = values.shape[0]
    return 0.5 * (ordered[:, (k - 1) // 2] + ordered[:, k // 2])


def _confirm(img: np.ndarray, cand: np.ndarray, margin: float, cfa: bool) -> np.ndarray:
    rows, cols = cand[:, 0], cand[:, 1]
    step = 2 if cfa else 1
    window = _take(img, rows, cols, [(dy * step, dx * step) for dy, dx in _WINDOW])
    value = window[12]
    local = _median_rows(window)
    brightest = window[_RING_AT].max(axis=0)
    excess = value - local
    hit = (excess > margin) & (excess > 3.0 * (brightest - local))
    if cfa and hit.any():
        keep = np.flatnonzero(hit)
        hit[keep] = excess[keep] > 6.0 * _adjacent_rise(img, rows[keep], cols[keep])
    return cand[hit]


def _adjacent_rise(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Largest rise of the eight adjacent (other-colour) pixels over their colour's level.

    Each colour's level is the median of its pixels on the border of the 7x7 window, three
    pixels out, beyond the reach of a star's core.
    """
    border = _take(img, rows, cols, _BORDER7)
    adjacent = _take(img, rows, cols, _ADJACENT)
    rise = np.full(rows.shape, -np.inf, np.float32)
    for parity in ((0, 1), (1, 0), (1, 1)):
        same = [i for i, (dy, dx) in enumerate(_BORDER7) if (dy % 2, dx % 2) == parity]
        level = _median_rows(border[same])
        near = [i for i, (dy, dx) in enumerate(_ADJACENT) if (dy % 2, dx % 2) == parity]
        np.maximum(rise, (adjacent[near] - level).max(axis=0), out=rise)
    return rise


# -- repairing them ----------------------------------------------------------------------------


def correct_pixels(
    image: np.ndarray, pixels: np.ndarray, cfa: bool = False, *, in_place: bool = False
) -> np.ndarray:
    """Replace the listed (row, col) pixels by the median of their eight same-colour neighbours.

    Neighbours are mirrored at the frame's edges; a neighbour that is itself listed still
    counts, which the median shrugs off unless defects cluster. Works on (H, W) and (H, W, C).
    """
    pixels = np.asarray(pixels)
    if pixels.size == 0:
        return image
    out = image if in_place else image.copy()
    step = 2 if cfa else 1
    rows, cols = pixels[:, 0], pixels[:, 1]
    ring = [(dy * step, dx * step) for dy, dx in _ADJACENT]
    if image.ndim == 2:
        planes = list(_take(image, rows, cols, ring))
    else:
        planes = [_gather(image, rows, cols, dy, dx) for dy, dx in ring]
    sort_planes(planes, np.empty_like(planes[0]))
    out[rows, cols] = 0.5 * (planes[3] + planes[4])
    return out
