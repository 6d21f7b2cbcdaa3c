"""From a linear stack to a picture: colour calibration, an automatic stretch, and PNG files.

A linear stack keeps the sky, the nebula and the stars within a few percent of the sensor's
range; shown as it is, it is black with a few white dots. The screen transfer function (STF)
of PixInsight is the standard automatic answer, and what users compare previews with:

1. *Shadows*: everything below ``median - 2.8 x MAD`` (the MAD normalised to a Gaussian
   sigma, 1.4826 x the median absolute deviation) goes to black. The sky's own noise peak
   then starts just above black, so the background is dark but not clipped: 2.8 sigma below
   the median clips 0.26 % of pure sky pixels.
2. *Normalisation*: the rest is scaled to 0..1 between that point and the image's maximum.
3. *Midtones*: the midtones transfer function ``MTF(m, x) = (m - 1) x / ((2m - 1) x - m)``
   (monotonic, MTF(m, 0) = 0, MTF(m, 1) = 1, MTF(m, m) = 1/2) with its balance ``m`` chosen so
   that the median lands at ``midtone`` (0.2 by default, ``previews.stretch_midtone``); that is
   ``m = MTF(midtone, median')`` of the normalised median ``median'``. A strong, smooth
   stretch of the faint end that leaves the bright end compressed but unclipped: in 8 bits
   only the cores of the brightest stars reach white.

Colour: *unlinked* (each channel its own shadows and midtones, the default) neutralises any
cast the sky has; *linked* (one transform from the channels' average statistics) keeps the
colour ratios of the linear data and wants ``neutralise_colour`` first, which

* subtracts each channel's sky level (the clipped background mesh, ``measure.background``)
  and puts back their mean, so the sky is grey, and
* scales the channels so that the median colour of the brightest unsaturated stars (aperture
  photometry, radius 2 FWHM, local sky from an annulus) is white: an average field star is
  close enough to white for a preview, and unlike a grey-world balance on all pixels it is
  not pulled by a red nebula filling the frame.

``write_png`` quantises to 8 bits (16 on request) with rounding, encodes on all cores
(``enhance.png``) and writes through ``frames.outputs.atomic_write_bytes``: a web page polling
the preview never reads half a file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np

from subwatch.enhance.png import encode_png
from subwatch.frames.outputs import atomic_write_bytes
from subwatch.measure.background import estimate_background
from subwatch.measure.frame import luminance, measure_frame
from subwatch.rowbands import for_row_bands

__all__ = [
    "auto_stretch",
    "mtf",
    "neutralise_colour",
    "stretch_parameters",
    "to_integers",
    "white_balance",
    "write_png",
]

#: Shadows clip this many normalised MADs below the median (PixInsight's AutoSTF value).
SHADOWS_CLIP = 2.8
#: MAD of a Gaussian times this is its sigma.
MAD_TO_SIGMA = 1.4826
#: Pixels sampled for the median and MAD (a strided subset: the statistics of a 26 MP frame
#: to better than 0.1 % for a fraction of the cost).
STAT_SAMPLES = 1_000_000
#: Stars whose colour sets the white balance: the brightest unsaturated ones with SNR above.
WHITE_STARS = 100
WHITE_MIN_SNR = 20.0
#: Fewer usable stars than this and only the sky is neutralised.
WHITE_MIN_STARS = 5


def mtf(m: float, x: np.ndarray | float) -> np.ndarray | float:
    """The midtones transfer function with balance ``m`` (0 < m < 1), for x in 0..1."""
    return (m - 1.0) * x / ((2.0 * m - 1.0) * x - m)


def as_planes(image: np.ndarray) -> np.ndarray:
    """(H, W, C) float32 view of a 2D or 3D image: mono and colour through one code path."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def _sample(plane: np.ndarray) -> np.ndarray:
    """A strided subset of a 2D plane's finite values, about ``STAT_SAMPLES`` of them."""
    step = max(1, int(math.sqrt(plane.size / STAT_SAMPLES)))
    values = plane[::step, ::step].ravel()
    return values[np.isfinite(values)]


def _median_mad(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 0.0
    median = float(np.median(values))
    return median, MAD_TO_SIGMA * float(np.median(np.abs(values - median)))


def stretch_parameters(
    median: float, mad: float, low: float, high: float, midtone: float
) -> tuple[float, float, float]:
    """Shadows clip ``c0``, white point and midtones balance ``m`` of one STF (ADU in)."""
    c0 = max(low, median - SHADOWS_CLIP * mad)
    white = max(high, c0 + 1e-12)
    normalised = (median - c0) / (white - c0)
    if normalised <= 0.0:
        return c0, white, 0.5
    m = float(mtf(midtone, normalised))
    return c0, white, min(max(m, 1e-7), 1.0 - 1e-7)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _stf(plane: np.ndarray, c0: np.float32, inv_range: np.float32, m: np.float32) -> np.ndarray:
    out = np.empty(plane.shape, np.float32)
    zero, one = np.float32(0.0), np.float32(1.0)
    a, b = m - one, np.float32(2.0) * m - one
    for i in range(plane.shape[0]):
        for j in range(plane.shape[1]):
            x = (plane[i, j] - c0) * inv_range
            if x < zero:  # NaN fails both tests and stays NaN (no data, black in a PNG)
                x = zero
            elif x > one:
                x = one
            out[i, j] = a * x / (b * x - m)
    return out


def _apply(plane: np.ndarray, c0: float, white: float, m: float) -> np.ndarray:
    """STF of one plane, float32, as a fresh array: one compiled pass (numpy needed six, 0.5 s
    at 26 MP on the reference machine). The pass uses numpy's error model: Python's checks the
    divisor of the transfer function for zero (it never is: ``b x - m`` lies between ``-m``
    and ``m - 1``), and the check kept the loop scalar (0.31 against 0.20 s at 26 MP)."""
    return _stf(plane, np.float32(c0), np.float32(1.0 / (white - c0)), np.float32(m))


def auto_stretch(image: np.ndarray, *, midtone: float = 0.2, linked: bool = False) -> np.ndarray:
    """Screen-transfer stretch of a linear image to float32 0..1, same shape (module doc).

    ``midtone`` is where the median lands; ``linked`` applies one transform to all channels
    of a colour image (from their mean median and MAD), otherwise each channel gets its own.
    """
    if not 0.0 < midtone < 1.0:
        raise ValueError(f"midtone must lie strictly between 0 and 1, not {midtone}")
    planes = as_planes(image)
    channels = planes.shape[2]
    low, high = float(np.min(planes)), float(np.max(planes))
    if not (math.isfinite(low) and math.isfinite(high)):
        finite = np.isfinite(planes)
        if not finite.any():
            return np.zeros(np.shape(image), np.float32)
        low = float(np.min(planes, where=finite, initial=np.inf))
        high = float(np.max(planes, where=finite, initial=-np.inf))
        planes = np.where(finite, planes, np.float32(low))  # what is not a number is black
    stats = [_median_mad(_sample(planes[:, :, c])) for c in range(channels)]
    if linked and channels > 1:
        median = float(np.mean([s[0] for s in stats]))
        mad = float(np.mean([s[1] for s in stats]))
        stats = [(median, mad)] * channels
    params = [stretch_parameters(median, mad, low, high, midtone) for median, mad in stats]
    if np.asarray(image).ndim == 2:
        return _apply(planes[:, :, 0], *params[0])
    out = np.empty(planes.shape, np.float32)
    for c, (c0, white, m) in enumerate(params):
        out[:, :, c] = _apply(planes[:, :, c], c0, white, m)
    return out


# ----------------------------------------------------------------------------- colour


def _star_colours(image: np.ndarray) -> np.ndarray:
    """(n, C) sky-subtracted aperture fluxes of the brightest unsaturated stars."""
    lum = luminance(image)
    m = measure_frame(lum)
    stars, fwhm = m.stars, m.fwhm
    if fwhm is None or len(stars) == 0:
        return np.zeros((0, image.shape[2]))
    radius = float(np.clip(2.0 * fwhm, 3.0, 12.0))
    half = math.ceil(radius + 8.0)
    h, w = lum.shape
    good = ~stars.saturated & (stars.snr >= WHITE_MIN_SNR)
    good &= (stars.x >= half) & (stars.x < w - half) & (stars.y >= half) & (stars.y < h - half)
    idx = np.flatnonzero(good)[:WHITE_STARS]  # the list is brightest first
    if idx.size == 0:
        return np.zeros((0, image.shape[2]))
    ix = np.rint(stars.x[idx]).astype(np.int64)
    iy = np.rint(stars.y[idx]).astype(np.int64)
    grid = np.arange(-half, half + 1)
    dx = grid[None, None, :] - (stars.x[idx] - ix)[:, None, None]
    dy = grid[None, :, None] - (stars.y[idx] - iy)[:, None, None]
    r2 = dx * dx + dy * dy
    aperture = r2 <= radius * radius
    annulus = (r2 >= (radius + 3.0) ** 2) & (r2 <= (radius + 8.0) ** 2)
    rows = iy[:, None, None] + grid[None, :, None]
    cols = ix[:, None, None] + grid[None, None, :]
    fluxes = []
    for c in range(image.shape[2]):
        stamps = image[rows, cols, c].astype(np.float64)
        sky = np.array([np.median(s[a]) for s, a in zip(stamps, annulus, strict=True)])
        flux = np.where(aperture, stamps - sky[:, None, None], 0.0).sum(axis=(1, 2))
        fluxes.append(flux)
    return np.stack(fluxes, axis=1)


def white_balance(image: np.ndarray) -> np.ndarray:
    """Per-channel factors that make the median star colour white (ones when unknown)."""
    planes = as_planes(image)
    channels = planes.shape[2]
    colours = _star_colours(planes)
    ok = np.all(colours > 0, axis=1) if colours.size else np.zeros(0, bool)
    if ok.sum() < WHITE_MIN_STARS:
        return np.ones(channels)
    colours = colours[ok]
    # Each star's colour relative to its own mean: the median over stars is the field's cast.
    relative = colours / colours.mean(axis=1, keepdims=True)
    cast = np.median(relative, axis=0)
    scale = 1.0 / cast
    return scale / scale.mean()


def neutralise_colour(image: np.ndarray) -> np.ndarray:
    """Grey sky and white stars: (H, W, 3) linear in, float32 linear out (module doc)."""
    planes = as_planes(image)
    if planes.shape[2] == 1:
        return np.asarray(image, np.float32).copy()
    sky = np.array([estimate_background(planes[:, :, c]).level for c in range(planes.shape[2])])
    scale = white_balance(planes)
    pedestal = float(np.mean(sky))
    out = np.empty(planes.shape, np.float32)
    for c in range(planes.shape[2]):
        plane = planes[:, :, c] - np.float32(sky[c])
        plane *= np.float32(scale[c])
        plane += np.float32(pedestal)
        out[:, :, c] = plane
    return out


# ----------------------------------------------------------------------------- files


def to_integers(stretched: np.ndarray, bits: int = 8) -> np.ndarray:
    """0..1 floats to uint8 or uint16, rounded (so a median of 0.2 stays 0.2 to 1/510)."""
    if bits not in (8, 16):
        raise ValueError(f"PNG depth must be 8 or 16 bits, not {bits}")
    top = np.float32(255.0 if bits == 8 else 65535.0)
    src = np.asarray(stretched, np.float32)
    out = np.empty(src.shape, np.uint8 if bits == 8 else np.uint16)
    if src.size == 0:
        return out
    src_rows, out_rows = src.reshape(src.shape[0], -1), out.reshape(out.shape[0], -1)

    # fmax/fmin return the number where the other operand is NaN: NaN goes to 0, and
    # infinities clip like any value (np.nan_to_num cost 0.6 s at 26 MP). Band by band, the
    # temporaries stay in cache: a full-size float copy cost 0.7-0.9 s at 26 MP when this
    # machine's fresh memory was slow, the bands 0.1 s or less.
    def band(rows: slice) -> None:
        scaled = np.fmax(src_rows[rows], np.float32(0.0))
        np.fmin(scaled, np.float32(1.0), out=scaled)
        scaled *= top
        scaled += np.float32(0.5)
        out_rows[rows] = scaled  # truncation, as astype

    for_row_bands(band, src_rows.shape[0], src_rows[0].nbytes)
    return out


def write_png(path: Path, stretched: np.ndarray, *, bits: int = 8) -> None:
    """Write a stretched (H, W) grey or (H, W, 3) RGB image (0..1) as a PNG, atomically."""
    arr = np.asarray(stretched)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
        raise ValueError(f"a PNG takes (H, W) or (H, W, 3) images, not shape {arr.shape}")
    pixels = to_integers(arr, bits)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    atomic_write_bytes(Path(path), encode_png(pixels))
