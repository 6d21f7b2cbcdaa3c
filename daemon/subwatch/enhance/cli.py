"""``subwatch enhance STACK.fits --out DIR``: the preview cycle on any linear FITS.

The same ``make_previews`` the daemon runs on its live stacks, on a finished stack from
subwatch, Siril or PixInsight: mono images, and colour cubes in either axis order ((3, H, W)
as FITS tools write them, or (H, W, 3)), integer or float, with NaN where there is no data.
The products go to ``DIR/<target>/<filter>/``, the layout of the daemon's output, with the
target and filter from the header (``OBJECT``, ``FILTER``; the file's name and ``nofilter``
or ``OSC`` when absent), and ``status.json`` holds the preview's numbers.

How the stack was made is read from the header where a stacker says it: subs from
``NCOMBINE`` (subwatch, PixInsight) or ``STACKCNT`` (Siril), total integration from
``LIVETIME`` (Siril) or ``EXPTIME`` (subwatch's total); without them the SNR is still measured,
only the forecast lacks its time axis.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from subwatch.enhance.previews import (
    PreviewOptions,
    PreviewRenderer,
    PreviewRequest,
    StackSnapshot,
    now_iso,
)
from subwatch.frames.outputs import write_json_atomic

log = logging.getLogger(__name__)

MIN_SIDE = 16


class EnhanceInputError(ValueError):
    """The input is not a linear image this command can work on; the message says why."""


def _image_hdu(hdul: fits.HDUList) -> Any:
    for hdu in hdul:
        image = isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)
        if image and hdu.header.get("NAXIS", 0) >= 2:
            return hdu
    raise EnhanceInputError("no image in this FITS file (only tables or empty HDUs)")


def _channel_last(data: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) from a 2D image or a cube in either axis order."""
    arr = np.asarray(data)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        if arr.shape[0] == 3:
            return np.moveaxis(arr, 0, -1)
        if arr.shape[2] == 3:
            return arr
        if arr.shape[2] == 1:
            return arr[:, :, 0]
    raise EnhanceInputError(
        f"image of shape {tuple(arr.shape)} is neither mono (H, W) nor colour (3, H, W)"
    )


def load_stack(path: Path) -> tuple[np.ndarray, fits.Header]:
    """A linear image as float32 (H, W) or (H, W, 3), NaN kept, and its header."""
    path = Path(path)
    if not path.is_file():
        raise EnhanceInputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False) as hdul:
                hdu = _image_hdu(hdul)
                header = hdu.header.copy()
                data = hdu.data
    except EnhanceInputError as exc:
        raise EnhanceInputError(f"{path}: {exc}") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise EnhanceInputError(f"{path}: not a FITS file ({exc})") from None
    if data is None:
        raise EnhanceInputError(f"{path}: the image HDU holds no data")
    try:
        image = _channel_last(data)
    except EnhanceInputError as exc:
        raise EnhanceInputError(f"{path}: {exc}") from None
    if min(image.shape[:2]) < MIN_SIDE:
        raise EnhanceInputError(f"{path}: image of {image.shape[1]}x{image.shape[0]} px too small")
    image = np.ascontiguousarray(image, dtype=np.float32)
    image[~np.isfinite(image)] = np.nan  # +-Inf is no data too
    if np.isnan(image).all():
        raise EnhanceInputError(f"{path}: every pixel is NaN")
    return image, header


def _number(header: fits.Header, *keys: str) -> float | None:
    for key in keys:
        try:
            value = float(header[key])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return None


def snapshot_of(path: Path, image: np.ndarray, header: fits.Header) -> StackSnapshot:
    from subwatch.stack import safe_name

    colour = image.ndim == 3
    target = safe_name(str(header.get("STACK") or header.get("OBJECT") or ""), "") or safe_name(
        path.stem, "stack"
    )
    filt = safe_name(str(header.get("FILTER") or ""), "OSC" if colour else "nofilter")
    frames = _number(header, "NCOMBINE", "STACKCNT")
    integration = _number(header, "LIVETIME", "EXPTIME")
    return StackSnapshot(
        image,
        target=target,
        filter=filt,
        n_frames=int(frames) if frames is not None else 1,
        integration_s=integration or 0.0,
    )


def enhance(path: Path, out: Path, options: PreviewOptions | None = None) -> dict[str, Any]:
    """Run the preview cycle on ``path``; returns the status.json document it wrote."""
    image, header = load_stack(path)
    snapshot = snapshot_of(path, image, header)
    folder = Path(out) / snapshot.target / snapshot.filter
    request = PreviewRequest(snapshot, folder, options or PreviewOptions(composite=False))
    status = PreviewRenderer()(request)
    doc = {
        "source": str(path),
        "target": snapshot.target,
        "filter": snapshot.filter,
        "frames_stacked": snapshot.n_frames,
        "integration_seconds": round(snapshot.integration_s, 3),
        **status,
        "updated": now_iso(),
    }
    write_json_atomic(folder / "status.json", doc)
    return doc


def _options(config: Path | None) -> PreviewOptions:
    if config is None:
        return PreviewOptions(composite=False)
    from subwatch.config import load_config

    cfg = load_config(config)
    return PreviewOptions.from_config(cfg)


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def run_cli(args: argparse.Namespace) -> int:
    """The command: 0, or 1 with one line on stderr (input errors raise ``EnhanceInputError``,
    a ``ValueError``, which ``subwatch.cli`` reports the same way)."""
    from subwatch.service.allocator import keep_freed_memory
    from subwatch.service.logs import setup_logging

    setup_logging("WARNING", "text")
    keep_freed_memory()  # the cycle's full-size temporaries reuse each other's memory
    options = _options(args.config)
    try:
        doc = enhance(args.stack, args.out, options)
    except EnhanceInputError:
        raise
    except Exception as exc:  # a stack the science cannot handle: one line, exit 1
        log.debug("enhance failed", exc_info=True)
        print(f"subwatch: enhance {args.stack}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    folder = Path(args.out) / doc["target"] / doc["filter"]
    preview = doc.get("preview", {})
    gradient = doc.get("gradient") or {}
    psf = doc.get("psf") or {}
    print(f"{args.stack}: {doc['target']}/{doc['filter']}, {doc['frames_stacked']} subs")
    print(
        f"  gradient {_fmt(gradient.get('amplitude_percent'), ' %')} towards "
        f"{_fmt(gradient.get('angle_deg'), ' deg', 0)}; SNR {_fmt(doc.get('snr'), '', 1)}; "
        f"PSF FWHM {_fmt(psf.get('fwhm'), ' px')}"
    )
    for product, why in preview.get("skipped", {}).items():
        print(f"  {product}: skipped, {why}")
    products = ", ".join(preview.get("products", []))
    seconds = preview.get("seconds", {}).get("total")
    print(f"  wrote {products}, status.json to {folder} in {_fmt(seconds, ' s', 1)}")
    return 0
