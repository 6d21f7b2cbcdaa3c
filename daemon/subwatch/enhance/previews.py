"""The preview cycle: from a linear stack to the images and numbers a user looks at.

One call, ``make_previews``, takes a snapshot of a stack (its linear mean image and what is
known about how it was made) and, in this order:

1. fits the sky **gradient** to star-free samples and removes it (subtracted for light
   pollution, divided for vignetting-like gradients);
2. measures the stack's **SNR** against the noise its subs promise (sqrt(N) growth) and
   forecasts the integration still needed to reach ``target_snr``; the SNR map (one value
   per cell of a few tens of pixels) goes to ``snr.fits``;
3. measures the **PSF** from the stack's stars and **deconvolves** the gradient-free image with
   it (regularised Richardson-Lucy, stopping early when it stops improving);
4. **denoises** the deconvolved image (the gradient-free one when nothing was deconvolved)
   with the shipped network (``subwatch.enhance.denoise``);
5. **stretches** each result for the eye and writes ``preview.png``, ``deconvolved.png``,
   ``denoised.png`` and the linear ``background.fits``, ``deconvolved.fits``,
   ``denoised.fits`` and ``snr.fits``, each atomically.

Steps 2 and 3 overlap: deconvolution keeps both cores busy for most of a cycle, and starts on
a thread of its own as soon as the gradient-free image exists, while the SNR report and the
preview (a stretch and a PNG, neither of which keeps two cores busy) are made and written
beside it. The cycle then takes little more than its CPU time over the cores (see
docs/decisions.md); step seconds are each step's own, so they add up to more than ``total``.

It returns the numbers for ``status.json``: the gradient, the SNR report and its forecast, the
PSF, and how long each step took. Nothing here knows about the daemon: the same function
serves ``subwatch enhance`` on any linear FITS and the preview worker on a live stack. A step
that cannot run (no stars for a PSF, no denoiser model) is skipped and said; one that fails
is a warning line and a ``failed`` entry in the status, and costs only its own product.

Colour stacks are (H, W, 3), channel last. Pixels no sub covered are NaN in the snapshot: they
are filled with the sky level for the science steps, black in the PNGs and NaN in the FITS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits

from subwatch import __version__
from subwatch.frames import write_fits_atomic

if TYPE_CHECKING:
    from subwatch.config import Config

log = logging.getLogger(__name__)

PRODUCTS = ("preview", "denoised", "deconvolved")
# The status.json fields a preview owns (the stack's own fields are the pipeline's).
PREVIEW_FIELDS = (
    "snr",
    "gradient",
    "snr_report",
    "psf",
    "deconvolution",
    "preview",
    "composite",
    "snr_history",
)


@dataclass(frozen=True)
class PreviewOptions:
    """What to render and how: the ``previews``, ``deconvolution`` and ``denoise`` settings."""

    products: tuple[str, ...] = PRODUCTS
    gradient_method: str = "polynomial"
    gradient_order: int = 2
    gradient_mode: str = "subtract"
    target_snr: float = 50.0
    midtone: float = 0.2
    linked: bool = True  # colour: one stretch for all channels (after neutralisation)
    png_bits: int = 8
    deconvolve: bool = True
    max_iterations: int = 30
    regularization: float = 0.002
    psf_size: int = 25
    psf_grid: bool = False
    denoise: bool = True
    denoise_model: str | None = None
    denoise_strength: float = 0.8
    denoise_tile: int = 512
    denoise_overlap: int = 48
    denoise_threads: int = 2
    composite: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> PreviewOptions:
        p, d, n = cfg.previews, cfg.deconvolution, cfg.denoise
        return cls(
            products=tuple(p.products),
            gradient_method=p.gradient,
            gradient_order=p.gradient_order,
            gradient_mode=p.gradient_mode,
            target_snr=p.target_snr,
            midtone=p.stretch_midtone,
            linked=p.colour_stretch == "linked",
            png_bits=p.png_bits,
            deconvolve=d.enabled,
            max_iterations=d.max_iterations,
            regularization=d.regularization,
            psf_size=d.psf_size,
            psf_grid=d.psf_grid,
            denoise=n.enabled,
            denoise_model=str(n.model) if n.model is not None else None,
            denoise_strength=n.strength,
            denoise_tile=n.tile,
            denoise_overlap=n.overlap,
            denoise_threads=n.threads,
        )

    def wants(self, product: str) -> bool:
        if product not in self.products:
            return False
        if product == "deconvolved":
            return self.deconvolve
        if product == "denoised":
            return self.denoise
        return True


@dataclass
class StackSnapshot:
    """A stack frozen at one moment: the image is this snapshot's own copy, never shared.

    ``sub_noises`` and ``weights`` describe the integrated subs (sky noise after
    normalisation, ADU, and the weight each got), from which the noise the stack should have
    follows; ``snr_history`` holds earlier ``(integration_seconds, snr)`` measurements of the
    same stack, which the forecast extrapolates. ``stars`` (x, y, flux, sigma; the stack's
    reference sub's, in the stack's grid) register the stack to the other filters of its
    target for a composite; without them the stars are measured on the image.
    """

    image: np.ndarray
    target: str = "stack"
    filter: str = "nofilter"
    n_frames: int = 1
    integration_s: float = 0.0
    sub_noises: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    snr_history: list[tuple[float, float]] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)
    stars: np.ndarray | None = None

    def without_image(self) -> StackSnapshot:
        """The metadata alone (the image travels apart, e.g. through shared memory)."""
        return StackSnapshot(
            np.empty((0,), np.float32),
            self.target,
            self.filter,
            self.n_frames,
            self.integration_s,
            list(self.sub_noises),
            list(self.weights),
            list(self.snr_history),
            dict(self.header),
            self.stars,
        )


@dataclass
class PreviewRequest:
    """One preview to make: a snapshot, the folder its products go to, and the options."""

    snapshot: StackSnapshot
    out_dir: Path
    options: PreviewOptions = field(default_factory=PreviewOptions)
    requested: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str]:
        return (self.snapshot.target, self.snapshot.filter)


@dataclass
class PreviewResult:
    """``status`` is what goes into status.json; ``flat`` is the gradient-free linear image."""

    status: dict[str, Any]
    flat: np.ndarray | None = None


class _Steps:
    """Seconds per step, and per product for the metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()  # steps of two threads add to the same entries

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            with self._lock:
                self.seconds[name] = round(self.seconds.get(name, 0.0) + spent, 4)

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 4)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def fill_invalid(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 image with NaN/Inf replaced by each channel's median, and the (H, W) bad mask.

    The science steps (gradient fit, star detection, FFT convolution) need finite pixels; the
    median is the sky level, so filled pixels look like empty sky to them.
    """
    img = np.array(image, dtype=np.float32, copy=True)
    finite = np.isfinite(img)
    if finite.all():
        return img, None
    if not finite.any():
        raise ValueError("the image has no finite pixels")
    if img.ndim == 2:
        img[~finite] = np.median(img[finite])
        return img, ~finite
    for c in range(img.shape[2]):
        plane, ok = img[:, :, c], finite[:, :, c]
        plane[~ok] = np.median(plane[ok]) if ok.any() else 0.0
    return img, ~finite.all(axis=2)


def _with_nan(image: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
    if bad is None:
        return image
    out = np.array(image, dtype=np.float32, copy=True)
    out[bad] = np.nan
    return out


def _fits_planes(image: np.ndarray) -> np.ndarray:
    """FITS stores colour as (planes, rows, cols)."""
    return np.moveaxis(image, -1, 0) if image.ndim == 3 else image


def _header(snapshot: StackSnapshot, product: str, **cards: Any) -> fits.Header:
    header = fits.Header()
    header["OBJECT"] = snapshot.target
    header["FILTER"] = snapshot.filter
    header["NCOMBINE"] = (snapshot.n_frames, "subs integrated")
    header["EXPTIME"] = (round(snapshot.integration_s, 3), "total integration, s")
    header["PRODUCT"] = (product, "subwatch preview product")
    for key, value in cards.items():
        header[key] = value
    header["SWCREATE"] = f"subwatch {__version__}"
    return header


def _round(value: Any, digits: int = 4) -> Any:
    """JSON-friendly numbers: rounded floats, None for NaN/Inf, containers walked."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float | np.floating):
        v = float(value)
        return round(v, digits) if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _round(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v, digits) for v in value]
    if isinstance(value, np.ndarray) and value.size <= 64:
        return _round(value.tolist(), digits)
    return value


# -- the steps ------------------------------------------------------------------------------


def _gradient(image: np.ndarray, opts: PreviewOptions) -> tuple[np.ndarray, Any]:
    """Fit the sky gradient (one surface per colour) and remove it: ``(flat, model)``."""
    from subwatch.enhance.gradient import fit_gradient, remove_gradient

    model = fit_gradient(image, method=opts.gradient_method, order=opts.gradient_order)
    flat = remove_gradient(image, model, mode=opts.gradient_mode)
    return np.asarray(flat, np.float32), model


def _gradient_doc(model: Any, opts: PreviewOptions) -> dict[str, Any]:
    return _round(
        {
            "amplitude_percent": getattr(model, "amplitude_percent", None),
            "angle_deg": getattr(model, "angle_deg", None),
            "method": getattr(model, "method", opts.gradient_method),
            "order": getattr(model, "order", None),
            "level": getattr(model, "level", None),
            "mode": opts.gradient_mode,
        },
        3,
    )


def _snr(
    stack: np.ndarray, gradient: Any, snap: StackSnapshot, opts: PreviewOptions
) -> tuple[dict, np.ndarray]:
    """The SNR report and map, on the stack with its sky (the gradient model is reused)."""
    from subwatch.enhance.snr import stack_snr_report

    report, snr_map = stack_snr_report(
        stack,
        n_frames=snap.n_frames,
        sub_noises=list(snap.sub_noises),
        weights=list(snap.weights),
        integration_s=snap.integration_s,
        snr_history=[tuple(p) for p in snap.snr_history],
        target_snr=opts.target_snr,
        gradient=gradient,
    )
    return dict(report), np.asarray(snr_map, np.float32)


def _deconvolve(
    flat: np.ndarray, opts: PreviewOptions, status: dict[str, Any], steps: _Steps
) -> np.ndarray | None:
    """Measure the PSF on the gradient-free image and deconvolve with it (None: no PSF).

    The deconvolver measures the sky and its noise itself, as its stopping rule expects them
    (per pixel, as second differences read them; the SNR report's noise is the unmixed one).
    """
    from subwatch.enhance.deconvolve import deconvolve
    from subwatch.enhance.psf import measure_psf

    with steps.step("psf"):
        psf = measure_psf(flat, size=opts.psf_size, grid=opts.psf_grid)
    status["psf"] = _round(psf.to_dict(), 4) if psf is not None else None
    if psf is None:
        log.info("deconvolved preview skipped: no stars to measure a PSF on")
        status["preview"]["skipped"]["deconvolved"] = "no stars to measure a PSF on"
        return None
    with steps.step("deconvolve"):
        result = deconvolve(
            flat,
            psf,
            max_iterations=opts.max_iterations,
            regularization=opts.regularization,
        )
    status["deconvolution"] = _round(
        {
            "iterations": int(result.iterations),
            "stopped": str(result.stopped),
            "seconds": float(result.seconds),
            **({"tiles": dict(result.tiles)} if getattr(result, "tiles", None) else {}),
        },
        3,
    )
    return np.asarray(result.image, np.float32)


def _stretch(image: np.ndarray, bad: np.ndarray | None, opts: PreviewOptions) -> np.ndarray:
    """0..1 for the eye; colour is neutralised (grey sky, white stars) and then stretched
    linked, which keeps the colour ratios of the data, or unlinked on request (each channel's
    sky at the midtone: it also hides what the neutralisation left of a cast, and shifts the
    colours of stars and nebulae)."""
    from subwatch.enhance.stretch import auto_stretch, neutralise_colour

    linked = False
    if image.ndim == 3:
        try:
            image, linked = neutralise_colour(image), opts.linked
        except Exception as exc:  # each channel stretched on its own still shows the stack
            log.warning("colour not neutralised (%s); channels stretched apart", one_line(exc))
    out = np.asarray(auto_stretch(image, midtone=opts.midtone, linked=linked), np.float32)
    if bad is not None:
        out[bad] = 0.0
    return out


def _png(path: Path, stretched: np.ndarray, bits: int) -> None:
    from subwatch.enhance.stretch import write_png

    write_png(path, stretched, bits=bits)


# -- denoise hook ---------------------------------------------------------------------------

Denoiser = Callable[[np.ndarray], np.ndarray]


def load_denoiser(opts: PreviewOptions) -> tuple[Denoiser | None, str]:
    """The learned denoiser (linear image in, linear image out, same shape), or None and why.

    The model is ``denoise.model``, else the one shipped in ``subwatch/models``; its
    onnxruntime session is made once and kept by the (long-lived) preview process. A missing
    or unreadable model, or no onnxruntime, is a reason, never an error: the other previews
    are made as usual and status.json says the denoised one was skipped and why.
    """
    from subwatch.enhance.denoise import DenoiseSettings
    from subwatch.enhance.denoise import load_denoiser as load

    return load(
        DenoiseSettings(
            model=opts.denoise_model,
            strength=opts.denoise_strength,
            tile=opts.denoise_tile,
            overlap=opts.denoise_overlap,
            threads=opts.denoise_threads,
        )
    )


# -- the cycle ------------------------------------------------------------------------------


class _Cycle:
    """One preview cycle's state: the filled image, what was written, timings, failures.

    Each product is made under ``guard``: a step that fails (a stack with too few sky boxes
    for a gradient, a defect in one step) is one warning line and a ``failed`` entry in
    status.json, and the other products are still made.
    """

    def __init__(self, snapshot: StackSnapshot, out_dir: Path, opts: PreviewOptions) -> None:
        self.snap, self.out, self.opts = snapshot, Path(out_dir), opts
        self.steps = _Steps()
        self.written: list[str] = []
        self.product_seconds: dict[str, float] = {}
        self.preview: dict[str, Any] = {
            "frames": snapshot.n_frames,
            "integration_seconds": round(snapshot.integration_s, 3),
            "products": self.written,
            "skipped": {},
            "failed": {},
            "seconds": self.steps.seconds,
            "product_seconds": self.product_seconds,
        }
        self.status: dict[str, Any] = {"preview": self.preview}
        with self.steps.step("prepare"):
            self.image, self.bad = fill_invalid(snapshot.image)
        self.flat = self.image
        self.sharp: np.ndarray | None = None  # the deconvolved image, once made
        self.model: Any = None

    @contextmanager
    def guard(self, product: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            why = one_line(exc)
            log.warning("%s/%s: %s failed: %s", self.snap.target, self.snap.filter, product, why)
            self.preview["failed"][product] = why

    def write_fits(self, name: str, data: np.ndarray, **cards: Any) -> None:
        with self.steps.step("write"):
            write_fits_atomic(self.out / name, data, _header(self.snap, name[:-5], **cards))
        self.written.append(name)

    def write_png(self, name: str, linear: np.ndarray) -> None:
        with self.steps.step("stretch"):
            stretched = _stretch(linear, self.bad, self.opts)
        with self.steps.step("write"):
            _png(self.out / name, stretched, self.opts.png_bits)
        self.written.append(name)

    def gradient(self) -> None:
        with self.steps.step("gradient"):
            self.flat, self.model = _gradient(self.image, self.opts)
        self.status["gradient"] = _gradient_doc(self.model, self.opts)
        background = np.asarray(self.model.background, np.float32)
        self.write_fits(
            "background.fits", _fits_planes(background), GRADMODE=self.opts.gradient_mode
        )

    def snr(self) -> None:
        with self.steps.step("snr"):
            report, snr_map = _snr(self.image, self.model, self.snap, self.opts)
        self.status["snr_report"] = _round(report, 4)
        self.status["snr"] = _round(report.get("snr"), 3)
        cell = report.get("snr_map_cell_px")
        cards = {"CELLPX": (cell, "px of the stack per map pixel")} if cell else {}
        if self.bad is not None and snr_map.shape == self.bad.shape:
            snr_map = _with_nan(snr_map, self.bad)
        self.write_fits("snr.fits", snr_map, **cards)

    def denoised(self) -> None:
        """The denoiser on the deconvolved stack (the gradient-free one when no deconvolved
        image was made); without a model, said in the log and in status.json.

        Denoising comes after deconvolution: deconvolution reads the stars' profiles through
        the noise and stops on it, and a denoised image would hand it smoothed profiles and
        no noise to stop on. The deconvolver leaves star-free sky exactly as it was, so the
        noise the network meets there is the stack's own. No-data pixels go in as NaN, so the
        noise is measured on real pixels only.
        """
        denoiser, why = load_denoiser(self.opts)
        if denoiser is None:
            log.info(
                "denoised preview of %s/%s skipped: %s", self.snap.target, self.snap.filter, why
            )
            self.preview["skipped"]["denoised"] = why
            return
        source = "deconvolved" if self.sharp is not None else "gradient-free"
        image = self.sharp if self.sharp is not None else self.flat
        with self.steps.step("denoise"):
            denoised = np.asarray(denoiser(_with_nan(image, self.bad)), np.float32)
        info = getattr(denoiser, "info", None) or {}
        self.preview["denoise"] = _round({"input": source, **info}, 4)
        self.write_png("denoised.png", denoised)
        self.write_fits("denoised.fits", _fits_planes(_with_nan(denoised, self.bad)))

    def deconvolved(self) -> None:
        deconvolved = _deconvolve(self.flat, self.opts, self.status, self.steps)
        if deconvolved is None:
            return
        self.sharp = deconvolved
        self.write_png("deconvolved.png", deconvolved)
        self.write_fits("deconvolved.fits", _fits_planes(_with_nan(deconvolved, self.bad)))

    def make(self, product: str, step: Callable[[], None]) -> None:
        """Run one product's step, guarded and timed (the timings feed the metrics)."""
        t0 = time.perf_counter()
        with self.guard(product):
            step()
            if product not in self.preview["skipped"]:
                self.product_seconds[product] = round(time.perf_counter() - t0, 4)


#: The order ``products`` lists what a cycle wrote, the order of the steps.
WRITTEN_ORDER = (
    "background.fits",
    "snr.fits",
    "preview.png",
    "deconvolved.png",
    "deconvolved.fits",
    "denoised.png",
    "denoised.fits",
)


def _written_order(name: str) -> int:
    return WRITTEN_ORDER.index(name) if name in WRITTEN_ORDER else len(WRITTEN_ORDER)


def make_previews(
    snapshot: StackSnapshot, out_dir: Path, options: PreviewOptions | None = None
) -> PreviewResult:
    """Render every wanted product of ``snapshot`` into ``out_dir``; see the module doc.

    Returns the status.json fields and the gradient-free linear image (for composites).
    """
    opts = options or PreviewOptions()
    cycle = _Cycle(snapshot, out_dir, opts)
    cycle.make("background", cycle.gradient)  # failed: the products keep the gradient
    sharpening = None
    if opts.wants("deconvolved"):  # beside the SNR report and the preview (module doc)
        sharpening = threading.Thread(
            target=cycle.make, args=("deconvolved", cycle.deconvolved), name="deconvolve"
        )
        sharpening.start()
    cycle.make("snr", cycle.snr)
    if opts.wants("preview"):
        cycle.make("preview", lambda: cycle.write_png("preview.png", cycle.flat))
    if sharpening is not None:
        sharpening.join()
        cycle.written.sort(key=_written_order)  # the same order whichever thread was first
    if opts.wants("denoised"):  # after deconvolution, on its result (see _Cycle.denoised)
        cycle.make("denoised", cycle.denoised)
    cycle.steps.seconds["total"] = cycle.steps.total()
    cycle.preview["updated"] = now_iso()
    return PreviewResult(status=cycle.status, flat=_with_nan(cycle.flat, cycle.bad))


def history_point(status: dict[str, Any]) -> tuple[float, float] | None:
    """The ``(integration_seconds, snr)`` a preview adds to its stack's SNR history."""
    snr = status.get("snr")
    seconds = status.get("preview", {}).get("integration_seconds")
    if snr is None or seconds is None or not np.isfinite(snr) or seconds <= 0:
        return None
    return (float(seconds), float(snr))


class PreviewRenderer:
    """``make_previews``, then the target's colour composite when its filters allow one.

    Lives where previews are made (the preview process, or the thread), and keeps, per
    target, the gradient-free image of each filter stack's latest preview: a composite needs
    all its channels, and they are previewed one stack at a time.
    """

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, Any]] = {}

    def __call__(self, request: PreviewRequest) -> dict[str, Any]:
        result = make_previews(request.snapshot, request.out_dir, request.options)
        status = result.status
        snap = request.snapshot
        if request.options.composite and result.flat is not None and result.flat.ndim == 2:
            target_dir = Path(request.out_dir).parent
            try:
                self._composite(snap, result.flat, target_dir, request.options, status)
            except Exception as exc:
                log.warning("%s: composite failed: %s", snap.target, one_line(exc))
                status["preview"]["failed"]["composite"] = one_line(exc)
        return status

    def _composite(
        self,
        snap: StackSnapshot,
        flat: np.ndarray,
        target_dir: Path,
        opts: PreviewOptions,
        status: dict[str, Any],
    ) -> None:
        from subwatch.enhance.composite import Channel, canonical_filter, write_composite
        from subwatch.enhance.stretch import auto_stretch

        if canonical_filter(snap.filter) is None:
            return
        channels = self._channels.setdefault(snap.target, {})
        channels[snap.filter] = Channel(snap.filter, flat, snap.stars)
        if len(channels) < 2:
            return
        t0 = time.perf_counter()
        palette = write_composite(
            target_dir / "composite.png",
            channels,
            lambda image: auto_stretch(image, midtone=opts.midtone),
            bits=opts.png_bits,
        )
        if palette is None:
            return
        spent = round(time.perf_counter() - t0, 4)
        status["composite"] = {"palette": palette, "filters": list(channels), "seconds": spent}
        status["preview"]["product_seconds"]["composite"] = spent
