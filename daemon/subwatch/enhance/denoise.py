"""The learned denoiser: a small convolutional network, run with onnxruntime, tile by tile.

The method, in plain words. The noise of a linear stack grows with its signal, so the image
is first variance-stabilised (``subwatch.enhance.vst``: the generalised Anscombe transform
with a noise model measured on the image itself), after which the noise is one unit
everywhere. One number, the median of the transformed image, is subtracted from the whole
image: the network sees the sky near 0 and one noise unit as 1, whatever the camera, the
exposure or the depth of the stack. Normalising once, for the whole image, matters: a tile
normalised by its own statistics is shifted and scaled differently from its neighbour, and
the seams between them show in the result.

The network reads two channels, the normalised image and a map of the noise in the same
units (1 where the stack is as deep as it gets; larger where fewer subs covered a pixel),
and returns the denoised first channel. It runs on tiles of ``tile`` pixels, because memory
grows with a tile's area, and neighbouring tiles overlap. Near its border a tile's output is
wrong: the network's padding stands in for the pixels it cannot see. So each tile gives up
``guard`` pixels at every edge it shares with a neighbour, and across the rest of the overlap
the two tiles are cross-faded with raised-cosine weights that add up to one; with a guard as
wide as the network's reach the tiled result equals the one-tile result to float precision.
Tiles start on multiples of the network's ``multiple_of`` (its downsampling factor), and the
image is reflected at its borders to whole tiles.

After the network, the image goes back through the exact unbiased inverse of the transform,
and three things are done in linear space:

* **star cores pass through**: where the (3x3-averaged) transformed image stands more than
  ``CORE_LOW`` noise units above its local background (a grey opening that removes what is
  narrower than ``CORE_BACKGROUND`` px: stars, not sky or nebula), ramping to
  ``CORE_HIGH``, grown by a pixel and feathered, the input is kept as it was. There the
  network has little noise to take away, and its smallest change to a peak shows. Measured
  above the local background, not above the image's sky: a deep stack's gradient and bright
  nebula stand tens of noise units above the sky over whole regions, and a rule on the
  level alone kept those with all their noise (see docs/decisions.md). Only from
  ``CORE_ABSOLUTE`` units up, where the network is outside its training and the noise a
  thousandth of the signal, is the input kept whatever the surroundings;
* **strength** blends the result with the input, ``s * denoised + (1 - s) * input``;
  ``s = 0`` gives the input back, bit for bit;
* **no data stays no data**: NaN pixels (where no sub reached) are filled with the sky for
  the network and are NaN again in the result.

Colour stacks put their luminance (the mean of the channels) through the network; each
channel's difference from the luminance (its chroma) is smoothed with a guided filter
steered by the denoised luminance, which keeps colour edges at stars while removing the
blotchy chroma noise. That costs one network pass instead of three (see docs/decisions.md
for the comparison with denoising every channel).

The network output is cached (keyed by the image's content): the same image denoised again
with another strength only re-blends. One onnxruntime session per model is kept alive for
the life of the process.

Verbs::

    denoiser, why = load_denoiser(DenoiseSettings())   # None and the reason without a model
    out = denoiser(linear_image)                       # same shape, NaN where the input was
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from subwatch.enhance.vst import NoiseModel, estimate_noise_model, forward, inverse

log = logging.getLogger(__name__)

#: The model shipped with subwatch, under ``subwatch/models``.
SHIPPED_MODEL = "denoiser.onnx"
#: Star cores: transformed level above the local background (noise units, 3x3 mean) where
#: the input starts to be kept, and where it is kept entirely.
CORE_LOW = 40.0
CORE_HIGH = 80.0
#: Side (px) of the square whose grey opening is a core's local background: wider than the
#: bright part of a star, narrower than the sky's and the nebula's large-scale structure.
CORE_BACKGROUND = 63
#: Level above the sky (noise units) from which the input is kept whatever its surroundings,
#: fully from twice that: so far up the network is outside what it learnt (on flat sky its
#: error is 0.3 units 1,000 units up, 2.4 at 10,000), and the noise is a thousandth of the
#: signal. Catches saturated tops too wide for ``CORE_BACKGROUND``.
CORE_ABSOLUTE = 1000.0
#: Tiles sent to onnxruntime in one call: fewer calls, same memory order as one tile.
BATCH = 2
#: Chroma of colour stacks: guided-filter radius (px) and regularisation (in units of the
#: luminance's sky noise variance, transformed).
CHROMA_RADIUS = 4
CHROMA_EPS = 4.0


class DenoiserUnavailable(RuntimeError):
    """The model cannot be used: missing, unreadable, or not a subwatch denoiser."""


@dataclass(frozen=True)
class DenoiseSettings:
    """The ``denoise`` section of the config: model path (None: the shipped model), blend
    strength (0 = input, 1 = fully denoised), tile side and overlap (px), CPU threads.

    ``colour``: ``"luminance"`` (one network pass, chroma guided-filtered) or ``"channels"``
    (every channel through the network on its own, three times the work); see the module doc.
    """

    model: str | None = None
    strength: float = 0.8
    tile: int = 512
    overlap: int = 48
    threads: int = 2
    colour: str = "luminance"


# -- the model ------------------------------------------------------------------------------


@dataclass
class Network:
    """One loaded model: the session, what its metadata promise, and the last result."""

    session: Any
    name: str
    multiple_of: int
    receptive_field: int
    metadata: dict[str, str]
    cache: tuple[bytes, np.ndarray, dict[str, Any]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """[N, 2, H, W] float32 in, [N, 1, H, W] float32 out."""
        (out,) = self.session.run(["output"], {"input": batch})
        return np.asarray(out, np.float32)


_NETWORKS: dict[tuple[Any, ...], Network] = {}
_NETWORKS_LOCK = threading.Lock()


def shipped_model() -> Path | None:
    """The model that ships with subwatch, or None when this install has none."""
    try:
        resource = resources.files("subwatch") / "models" / SHIPPED_MODEL
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return Path(str(resource)) if resource.is_file() else None


def _metadata_int(meta: dict[str, str], key: str, default: int) -> int:
    try:
        value = int(float(meta.get(key, default)))
    except ValueError as exc:
        raise DenoiserUnavailable(f"metadata {key}={meta[key]!r} is not a number") from exc
    if value < 1:
        raise DenoiserUnavailable(f"metadata {key}={value} must be >= 1")
    return value


def load_network(path: Path, threads: int = 2) -> Network:
    """The onnxruntime session for ``path``: made once per process and kept.

    A session costs a second or two to build (graph optimisation), a tile a fraction of
    that; the preview process lives all night, so it pays once. A file changed on disk
    (other mtime or size) is loaded afresh. Raises ``DenoiserUnavailable`` with the reason.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DenoiserUnavailable("onnxruntime is not installed") from exc
    try:
        stat = path.stat()
    except OSError as exc:
        raise DenoiserUnavailable(f"denoiser model {path} not found") from exc
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, int(threads))
    with _NETWORKS_LOCK:
        if key in _NETWORKS:
            return _NETWORKS[key]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        # The preview process runs at the lowest priority beside the per-frame path: threads
        # that spin while waiting would only take CPU from it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise DenoiserUnavailable(
                f"denoiser model {path} could not be loaded: {text[0] if text else exc}"
            ) from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if "input" not in inputs or "output" not in outputs:
            raise DenoiserUnavailable(
                f"denoiser model {path} has inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)}; expected 'input' and 'output'"
            )
        shape = inputs["input"].shape
        if len(shape) != 4 or shape[1] not in (2, "2"):
            raise DenoiserUnavailable(f"denoiser model {path} takes {shape}; expected [N, 2, H, W]")
        meta = dict(session.get_modelmeta().custom_metadata_map)
        network = Network(
            session=session,
            name=path.name,
            multiple_of=_metadata_int(meta, "multiple_of", 1),
            receptive_field=_metadata_int(meta, "receptive_field", 1),
            metadata=meta,
        )
        _NETWORKS.clear()  # one model at a time: a replaced file frees the old session
        _NETWORKS[key] = network
        return network


class Denoiser:
    """Linear image in, denoised linear image out (same shape; NaN where the input is NaN).

    Mono images are (H, W); colour are (H, W, C), channel last, as the preview cycle holds
    them. ``info`` describes the last call (for status.json).
    """

    def __init__(self, network: Network, settings: DenoiseSettings | None = None) -> None:
        self.network = network
        self.settings = settings or DenoiseSettings()
        self.info: dict[str, Any] = {}

    # The layout: how far a tile's padding reaches into its output, and how tiles overlap.
    @property
    def guard(self) -> int:
        """Pixels a tile gives up at an edge shared with a neighbour: the network's reach
        (half its receptive field), on the tile grid."""
        return _round_up((self.network.receptive_field + 1) // 2, self.network.multiple_of)

    @property
    def overlap(self) -> int:
        """Overlap of neighbouring tiles: at least the configured one, and room for both
        tiles' guards plus a cross-fade of at least a quarter of the guard."""
        need = max(self.settings.overlap, 2 * self.guard + max(8, self.guard // 4))
        return _round_up(need, self.network.multiple_of)

    @property
    def tile(self) -> int:
        """Tile side: the configured one on the network's grid, at least twice the overlap."""
        return _round_up(max(self.settings.tile, 2 * self.overlap + 16), self.network.multiple_of)

    def __call__(
        self,
        image: np.ndarray,
        strength: float | None = None,
        noise_model: NoiseModel | None = None,
    ) -> np.ndarray:
        """Denoise ``image`` and blend with ``strength`` (default: the settings')."""
        s = float(self.settings.strength if strength is None else strength)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be within 0..1, got {s}")
        image = np.asarray(image, np.float32)
        if s == 0.0:
            self.info = {"strength": 0.0}
            return image.copy()
        denoised = self.network_output(image, noise_model)
        self.info["strength"] = s
        return _blend(image, denoised, s)

    def network_output(
        self, image: np.ndarray, noise_model: NoiseModel | None = None
    ) -> np.ndarray:
        """The fully denoised image (star cores already put back), cached by content."""
        image = np.ascontiguousarray(image, np.float32)
        if image.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) or (H, W, C), got shape {image.shape}")
        key = self._key(image, noise_model)
        with self.network.lock:
            cached = self.network.cache
            if cached is not None and cached[0] == key:
                self.info = {**cached[2], "cached": True}
                return cached[1]
            t0 = time.perf_counter()
            if image.ndim == 2:
                out, info = self._mono(image, noise_model)
            elif image.shape[2] == 1:
                out, info = self._mono(image[:, :, 0], noise_model)
                out = out[:, :, None]
            elif self.settings.colour == "channels":
                out, info = self._channels(image, noise_model)
            else:
                out, info = self._colour(image, noise_model)
            info["seconds"] = round(time.perf_counter() - t0, 3)
            self.network.cache = (key, out, info)
            self.info = {**info, "cached": False}
            return out

    def _key(self, image: np.ndarray, noise_model: NoiseModel | None) -> bytes:
        digest = hashlib.blake2b(image.data, digest_size=16)
        setup = (image.shape, noise_model, self.tile, self.overlap, self.settings.colour)
        digest.update(repr(setup).encode())
        return digest.digest()

    # -- mono and colour --------------------------------------------------------------------

    def _mono(
        self, image: np.ndarray, noise_model: NoiseModel | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        valid = np.isfinite(image)
        denoised, core, info = self._network_pass(image, valid, noise_model)
        out = _keep_cores(image, denoised, core)
        out[~valid] = np.nan
        return out.astype(np.float32), info

    def _colour(
        self, image: np.ndarray, noise_model: NoiseModel | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Luminance through the network; chroma guided-filtered by the denoised luminance."""
        valid = np.isfinite(image).all(axis=2)
        lum = image.mean(axis=2)
        lum[~valid] = np.nan
        guide, core, info = self._network_pass(lum, valid, noise_model)
        guide[~valid] = float(np.median(guide[valid]))
        eps = np.float32(CHROMA_EPS * info["noise_model"]["sigma"] ** 2)
        out = np.empty_like(image)
        for c in range(image.shape[2]):
            chroma = np.where(valid, image[:, :, c] - lum, 0.0).astype(np.float32)
            out[:, :, c] = guide + guided_filter(guide, chroma, CHROMA_RADIUS, eps)
        out = _keep_cores(image, out, core[:, :, None])  # star cores keep their colour too
        out[~valid] = np.nan
        info["colour"] = "luminance through the network, chroma guided-filtered"
        return out.astype(np.float32), info

    def _channels(
        self, image: np.ndarray, noise_model: NoiseModel | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Every channel through the network with its own noise model."""
        valid = np.isfinite(image).all(axis=2)
        out = np.empty_like(image)
        infos = []
        for c in range(image.shape[2]):
            plane = np.where(valid, image[:, :, c], np.nan).astype(np.float32)
            out[:, :, c], info = self._mono(plane, noise_model)
            infos.append(info)
        info = {**infos[0], "tiles": sum(i["tiles"] for i in infos), "colour": "per channel"}
        info["noise_model"] = [i["noise_model"] for i in infos]
        return out, info

    def _network_pass(
        self, image: np.ndarray, valid: np.ndarray, noise_model: NoiseModel | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One plane through transform, network and inverse: ``(denoised, core, info)``.

        The noise model (unless given) and the centre are measured once on the whole plane.
        """
        if not valid.any():
            raise ValueError("the image has no finite pixels")
        nm = noise_model or estimate_noise_model(image)
        z = forward(image, nm)  # NaN stays NaN
        centre = float(np.median(z[valid]))
        z -= np.float32(centre)
        z[~valid] = 0.0  # no data: the sky, to the network
        zd, tiles, side = self._tiled(z)  # noise map 1: the snapshot has no per-pixel depth
        denoised = inverse(zd + np.float32(centre), nm)
        core = core_weight(z)
        info = {
            "noise_model": {"gain": nm.gain, "sigma": nm.sigma, "offset": nm.offset},
            "tiles": tiles,
            "tile": side,
            "overlap": self.overlap,
            "core_pixels": int(np.count_nonzero(core > 0.5)),
        }
        return denoised, core, info

    # -- tiles -------------------------------------------------------------------------------

    def _tiled(
        self, z: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, int, list[int]]:
        """Run the network over ``z`` (normalised, finite) tile by tile, with ``noise`` as
        the noise map (None: 1 everywhere); returns the blended output, the tile count and
        the tiles' (height, width)."""
        h, w = z.shape
        m, g = self.network.multiple_of, self.guard
        # Reflect by the guard on every side (border pixels get real-looking context), and
        # further at the bottom and right up to the network's grid.
        ph, pw = _round_up(h + 2 * g, m), _round_up(w + 2 * g, m)
        pad = ((g, ph - h - g), (g, pw - w - g))
        zp = _reflect(z, pad)
        noise_p = None if noise is None else _reflect(noise, pad)
        rows = axis_tiles(ph, self.tile, self.overlap, g, m)
        cols = axis_tiles(pw, self.tile, self.overlap, g, m)
        th, tw = rows[0][1].size, cols[0][1].size  # every tile has the same size
        out = np.zeros((ph, pw), np.float32)
        jobs = [(r, c) for r in rows for c in cols]
        batch = np.ones((BATCH, 2, th, tw), np.float32)
        for i in range(0, len(jobs), BATCH):
            chunk = jobs[i : i + BATCH]
            for k, ((y, _), (x, _)) in enumerate(chunk):
                batch[k, 0] = zp[y : y + th, x : x + tw]
                if noise_p is not None:
                    batch[k, 1] = noise_p[y : y + th, x : x + tw]
            result = self.network.run(batch[: len(chunk)])
            for k, ((y, wy), (x, wx)) in enumerate(chunk):
                out[y : y + th, x : x + tw] += result[k, 0] * wy[:, None] * wx[None, :]
        return out[g : g + h, g : g + w], len(jobs), [th, tw]


# -- pieces usable on their own -------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def _reflect(a: np.ndarray, pad: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Reflect padding that also works when the pad is wider than the image."""
    out = a
    while any(p > 0 for pair in pad for p in pair):
        step = tuple(
            (min(before, out.shape[i] - 1), min(after, out.shape[i] - 1))
            for i, (before, after) in enumerate(pad)
        )
        out = np.pad(out, step, mode="reflect")
        pad = tuple((b - s[0], a_ - s[1]) for (b, a_), s in zip(pad, step, strict=True))
    return np.ascontiguousarray(out, np.float32)


def _ramp(n: int, guard: int) -> np.ndarray:
    """Weight of the later tile across an overlap of ``n`` px: 0 over the first ``guard``,
    a raised cosine to 1, and 1 over the last ``guard``. The earlier tile gets 1 - ramp, so
    the two always add up to one."""
    t = np.arange(n, dtype=np.float64) + 0.5
    span = max(n - 2 * guard, 1)
    u = np.clip((t - guard) / span, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * u)).astype(np.float32)


def axis_tiles(
    length: int, tile: int, overlap: int, guard: int, multiple: int = 1
) -> list[tuple[int, np.ndarray]]:
    """Tiles along one axis of ``length`` px (a multiple of ``multiple``): each tile's start
    and its 1-D blending weight.

    As few tiles as ``tile`` px with ``overlap`` allow, then made as small as still covers
    the axis with at least that overlap, and spread evenly: a 6296 px axis takes 14 tiles of
    504 px rather than 14 of 512 with the last one overlapping by 400 (12 % more pixels
    through the network instead of 29 %). Starts and sides are multiples of ``multiple``.
    An axis no longer than a tile is one tile. The weights add up to one everywhere.
    """
    if length <= tile:
        return [(0, np.ones(length, np.float32))]
    n = -(-(length - overlap) // (tile - overlap))
    side = min(tile, _round_up(-(-(length + (n - 1) * (overlap + multiple)) // n), multiple))
    starts = [round(i * (length - side) / (n - 1) / multiple) * multiple for i in range(n)]
    weights = [np.ones(side, np.float32) for _ in starts]
    for i in range(n - 1):
        shared = starts[i] + side - starts[i + 1]
        ramp = _ramp(shared, guard)
        weights[i][side - shared :] *= 1.0 - ramp
        weights[i + 1][:shared] *= ramp
    return list(zip(starts, weights, strict=True))


def core_weight(z: np.ndarray) -> np.ndarray:
    """0..1, where the input is kept: bright cores in a normalised transformed image ``z``.

    A core stands out from its surroundings, so the level is measured above the local
    background, not above the image's sky: a deep stack's sky gradient or a bright nebula
    lies tens of noise units above the median over whole regions, and a threshold on the
    level itself would pass those through with their noise. The background is a grey
    opening (erosion, then dilation) by a ``CORE_BACKGROUND`` px square, which removes what
    is narrower than that (stars) and follows what is broader (sky, nebula). From
    ``CORE_ABSOLUTE`` units above the sky the level alone decides (tops wider than the square).
    The 3x3 mean keeps noise from reaching the threshold (its std is a third of a unit). The
    mask is grown by one pixel and feathered outwards only (the larger of the mask and its
    blur by a one-pixel Gaussian): inside it stays exactly 1, and the hand-over from
    denoised wings to kept cores is smooth.
    """
    level = cv2.blur(np.asarray(z, np.float32), (3, 3), borderType=cv2.BORDER_REFLECT)
    square = np.ones((CORE_BACKGROUND, CORE_BACKGROUND), np.uint8)
    background = cv2.morphologyEx(level, cv2.MORPH_OPEN, square, borderType=cv2.BORDER_REFLECT)
    # In place, as the frame is large: weight = clip((level - background - LOW) / span, 0, 1),
    # and at least clip((level - ABSOLUTE) / ABSOLUTE, 0, 1).
    absolute = np.multiply(level, np.float32(1.0 / CORE_ABSOLUTE))
    absolute -= np.float32(1.0)
    weight = np.subtract(level, background, out=level)
    del background
    weight -= np.float32(CORE_LOW)
    weight *= np.float32(1.0 / (CORE_HIGH - CORE_LOW))
    np.maximum(weight, absolute, out=weight)
    del absolute
    np.clip(weight, 0.0, 1.0, out=weight)
    if not weight.any():
        return weight
    weight = cv2.dilate(weight, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REFLECT)
    blurred = cv2.GaussianBlur(weight, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
    return np.maximum(weight, blurred)


def _keep_cores(image: np.ndarray, denoised: np.ndarray, core: np.ndarray) -> np.ndarray:
    """``core * image + (1 - core) * denoised``: the input bit for bit where ``core`` is 1."""
    kept = np.where(np.isfinite(image), image, 0.0).astype(np.float32)
    return (core * kept + (np.float32(1.0) - core) * denoised).astype(np.float32)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He, Sun & Tang's guided filter: ``src`` smoothed, following the edges of ``guide``.

    Locally ``out = a * guide + b``: where the guide is flat (sky) ``a`` goes to 0 and the
    output is the box mean of ``src``; where it has structure far above ``eps`` (stars) the
    output follows the guide's shape.
    """
    size = (2 * radius + 1, 2 * radius + 1)

    def box(a: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(a, cv2.CV_32F, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(src)
    var_i = box(guide * guide) - mean_i * mean_i
    cov_ip = box(guide * src) - mean_i * mean_p
    a = cov_ip / (var_i + np.float32(eps))
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def _blend(image: np.ndarray, denoised: np.ndarray, strength: float) -> np.ndarray:
    """``strength * denoised + (1 - strength) * image``, in linear space."""
    if strength >= 1.0:
        return denoised.copy()
    s = np.float32(strength)
    return (s * denoised + (np.float32(1.0) - s) * image).astype(np.float32)


def load_denoiser(settings: DenoiseSettings) -> tuple[Denoiser | None, str]:
    """The denoiser for ``settings``, or None and why (no model, unreadable model, no
    onnxruntime). Never raises: previews go on without it."""
    if settings.model is not None:
        path = Path(settings.model).expanduser()
        if not path.is_file():
            return None, f"denoiser model {path} not found"
    else:
        found = shipped_model()
        if found is None:
            return None, "no denoiser model available"
        path = found
    try:
        network = load_network(path, settings.threads)
    except DenoiserUnavailable as exc:
        return None, str(exc)
    return Denoiser(network, settings), ""
