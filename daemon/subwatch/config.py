"""The daemon's configuration: one YAML file, strict keys, command-line flags on top.

Everything subwatch can be told lives in a single YAML file with one mapping per section
(``watch``, ``output``, ``frames``, ``calibration``, ``gates``, ``stacking``, ``previews``,
``denoise``, ``deconvolution``, ``http``, ``logging``). Every key is optional; a missing key, a
missing section, an empty section or an empty file all mean "use the default", so a config only
needs the lines that differ from the defaults.

Keys are strict on purpose: the daemon runs unattended for a whole night, and a misspelt key that
was silently ignored (``pathh: /data``) is only discovered at dawn. Each section is a pydantic
model that forbids unknown keys, so such a file is refused at start-up with a message that names
the key path, the bad value and what is allowed, one line per problem, and suggests the nearest
valid key for a typo. ``load_config`` reads and validates a file; ``apply_overrides`` layers the
command-line flags (``--watch``, ``--output``, ``--calibration``, ``--http``) over it, so a flag
always wins over the file.

Paths: ``~`` is expanded, and a relative path written in the file is taken relative to the
directory holding that file (not the directory the daemon happens to be started from), so a
config and the folders it names can be moved together. Relative paths given as flags are taken
relative to the current directory, like any other command-line path. Note that a bare ``~`` is
YAML for null: write ``~/captures``, never ``~`` alone.

``default_config_yaml`` renders the fully commented default file from the models themselves (the
shipped ``config/subwatch.yaml`` is exactly that text), so the documentation of every key lives
in one place and cannot drift from the code.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = [
    "CalibrationConfig",
    "Config",
    "ConfigError",
    "DeconvolutionConfig",
    "DenoiseConfig",
    "FramesConfig",
    "GatesConfig",
    "HttpConfig",
    "LoggingConfig",
    "OutputConfig",
    "PreviewsConfig",
    "StackingConfig",
    "WatchConfig",
    "apply_overrides",
    "default_config_yaml",
    "format_validation_error",
    "load_config",
    "render_config_yaml",
    "split_listen",
]


class ConfigError(Exception):
    """A configuration that cannot be used; ``str(err)`` is the complete message for the user.

    The message has one line per problem, each prefixed with its source (the file name or
    ``command line``), so the CLI can print it as is and exit. ``problems`` holds the same lines
    as a list for callers that want to show them differently.
    """

    def __init__(self, problems: str | list[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# Shared field types
# --------------------------------------------------------------------------------------------

# The error type used by every custom check below. Its context carries ``allowed`` (what would
# have been accepted), and optionally ``key`` (a field below the location pydantic reports,
# for checks that span several fields) and ``value`` (the offending value when it is not the
# whole input, e.g. one pattern out of a list). ``format_validation_error`` reads all three.
_NOT_ALLOWED = "not_allowed"


def _not_allowed(allowed: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(_NOT_ALLOWED, "{allowed}", {"allowed": allowed, **ctx})


def _reject_empty_path(value: Any) -> Any:
    # Path("") silently becomes ".", which would resolve to the config's own directory: almost
    # certainly not what an empty value meant, so refuse it and point at null instead.
    if isinstance(value, str) and not value.strip():
        raise _not_allowed("must be a non-empty path; write null for none")
    return value


def _expand_path(value: Path, info: ValidationInfo) -> Path:
    # Runs for every path field. ``base_dir`` is in the context only when the value came from a
    # file (load_config); a relative path is then anchored to that file's directory. normpath,
    # not resolve(): a symlinked data disk should keep the name the user wrote.
    try:
        path = value.expanduser()
    except RuntimeError as exc:  # no home directory to expand ~ against
        raise _not_allowed(f"cannot expand '~': {exc}") from exc
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(os.path.normpath(Path(base) / path))
    return path


ConfigPath = Annotated[Path, BeforeValidator(_reject_empty_path), AfterValidator(_expand_path)]
"""A filesystem path: ``~`` expanded, relative to the config file's directory when read from one."""


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are re-validated.

    ``allow_inf_nan=False`` because YAML spells infinity and NaN (``.inf``, ``.nan``) and neither
    is a meaningful threshold or duration here; ``validate_assignment`` keeps a config that code
    modifies after loading just as valid as one read from a file.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


def _check_patterns(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not pattern.strip():
            raise _not_allowed("patterns must not be empty", value=pattern)
        if "/" in pattern or "\\" in pattern:
            raise _not_allowed(
                "patterns match the file name only, so they cannot contain a '/' or '\\'",
                value=pattern,
            )
    return patterns


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class WatchConfig(_Section):
    """Which files to pick up from the capture folder, and when a file counts as complete.

    Capture programs write a sub over seconds and sometimes rename it at the end, so a file is
    only processed once its size and modification time have stopped changing.
    """

    path: ConfigPath | None = Field(
        None,
        description="Capture folder to watch; `run` needs this key or the --watch flag.",
    )
    recursive: bool = Field(
        True, description="Also watch subfolders (capture programs often make one per night)."
    )
    include: list[str] = Field(
        default_factory=lambda: ["*.fits", "*.fit", "*.fts", "*.fz", "*.xisf", "*.tif", "*.tiff"],
        min_length=1,
        description="File-name patterns (fnmatch, case-insensitive) of the files to process.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: [".*", "~*", "*.tmp", "*.part"],
        description="File-name patterns skipped even when they match include (temporary files).",
    )
    mode: Literal["auto", "inotify", "polling"] = Field(
        "auto",
        description="How to notice new files; auto uses inotify where it works, else polling.",
    )
    settle_seconds: float = Field(
        2.0, ge=0, description="Seconds a file's size and mtime must stay unchanged before use."
    )
    poll_seconds: float = Field(
        1.0, gt=0, description="Seconds between directory scans in polling mode."
    )
    rescan_seconds: float = Field(
        60.0, gt=0, description="Seconds between full rescans that catch events the OS dropped."
    )
    incomplete_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="Seconds after which a file still shorter than its header says is truncated.",
    )

    _check_include = field_validator("include", "ignore")(_check_patterns)

    @model_validator(mode="after")
    def _timeout_after_settle(self) -> WatchConfig:
        # A file is only looked at after it settles, so a shorter timeout would report every
        # slow write as truncated before it had a chance to finish.
        if self.incomplete_timeout_seconds < self.settle_seconds:
            raise _not_allowed(
                f"must be >= watch.settle_seconds = {self.settle_seconds:g}",
                key="incomplete_timeout_seconds",
                value=self.incomplete_timeout_seconds,
            )
        return self


class OutputConfig(_Section):
    """Where stacks, previews, masters, checkpoints and the journal are written."""

    path: ConfigPath = Field(
        Path("subwatch-out"),
        description="Output folder (created if missing); one subfolder per target and filter.",
    )


class FramesConfig(_Section):
    """Limits on the images read, checked from the header before any pixel memory is allocated."""

    max_dimension: int = Field(
        20000,
        ge=16,
        description="Largest accepted width or height in pixels; bigger images are refused.",
    )


class CalibrationConfig(_Section):
    """Master bias/dark/flat selection and cosmetic correction.

    Masters are matched to each light by its header (camera, binning, gain, offset, temperature,
    exposure, filter), so the tolerances here decide how strict that match is.
    """

    path: ConfigPath | None = Field(
        None,
        description="Library of masters and raw calibration frames; null keeps masters in output.",
    )
    min_frames: int = Field(
        3, ge=1, description="Fewest raw frames needed to build a master from a library group."
    )
    temperature_tolerance: float = Field(
        3.0, ge=0, description="Largest sensor temperature difference for a matching master, °C."
    )
    exposure_tolerance: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest relative exposure difference for a dark to match (0.05 = 5 %).",
    )
    scale_darks: bool = Field(
        True,
        description="Without an exposure match, scale the nearest dark (needs a master bias).",
    )
    cosmetic: bool = Field(
        True, description="Replace hot and cold pixels found in the master dark and flat."
    )
    hot_sigma: float = Field(
        5.0, gt=0, description="A pixel this many sigma above its neighbours counts as hot."
    )


class GatesConfig(_Section):
    """Quality gates that keep bad subs out of the stack.

    Absolute gates apply from the first sub; ratio gates compare a sub with the running median
    of the subs already accepted for the same stack, so they wait for ``warmup_frames`` subs.
    """

    enabled: bool = Field(
        True, description="Apply the gates; false stacks every sub that registers."
    )
    min_stars: int = Field(8, ge=0, description="Fewest detected stars for a usable sub.")
    max_fwhm_ratio: float = Field(
        1.5, ge=1, description="Largest FWHM relative to the running median (focus, seeing)."
    )
    max_eccentricity: float = Field(
        0.7, gt=0, le=1, description="Largest median star eccentricity, 0 = round (guiding, wind)."
    )
    min_star_ratio: float = Field(
        0.5, ge=0, le=1, description="Fewest stars relative to the running median (clouds)."
    )
    max_background_ratio: float = Field(
        1.6,
        ge=1,
        description="Largest sky background relative to the running median (clouds, dawn, moon).",
    )
    min_flux_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Lowest flux of the brightest stars relative to the running median (haze).",
    )
    max_saturated_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest fraction of detected stars with clipped cores (overexposure).",
    )
    warmup_frames: int = Field(
        3, ge=1, description="Accepted subs needed before the ratio gates apply."
    )


class StackingConfig(_Section):
    """Registration onto the reference sub and the running stack itself."""

    transform: Literal["similarity", "affine"] = Field(
        "similarity",
        description="Registration model: similarity (shift, rotation, scale) or full affine.",
    )
    interpolation: Literal["lanczos", "cubic", "linear"] = Field(
        "cubic",
        description="Resampling of each sub onto the reference (lanczos: sharper, 10x slower).",
    )
    rejection: Literal["kappa-sigma", "none"] = Field(
        "kappa-sigma",
        description="Per-pixel outlier rejection (satellites, planes, cosmic rays).",
    )
    kappa: float = Field(
        3.0, gt=0, description="Rejection threshold in standard deviations from the pixel mean."
    )
    rejection_warmup: int = Field(
        5, ge=2, description="Subs in a stack before rejection starts (statistics need a few)."
    )
    weighting: Literal["noise", "none"] = Field(
        "noise", description="Weight each sub by inverse background noise variance, or equally."
    )
    normalize: bool = Field(
        True, description="Match each sub's background offset and scale to the reference."
    )
    checkpoint_frames: int = Field(
        5, ge=1, description="Write a stack checkpoint at least every this many accepted subs."
    )
    checkpoint_seconds: float = Field(
        120.0, gt=0, description="Also write one at least this often while subs arrive, in seconds."
    )
    max_registration_rms: float = Field(
        0.5,
        gt=0,
        description="Largest star-match residual RMS in pixels; worse fails registration.",
    )
    new_stack_jump_deg: float = Field(
        0.1,
        gt=0,
        description="Pointing jump (deg, from the headers) that starts a new stack when a sub"
        " matches no stack.",
    )
    min_inliers: int = Field(
        6, ge=3, description="Fewest matched stars for a registration to be trusted."
    )


class PreviewsConfig(_Section):
    """Rendered previews of each stack: stretched, gradient-removed, optionally enhanced.

    Previews are for looking at; they never feed back into the stack.
    """

    enabled: bool = Field(True, description="Render previews at all.")
    every_frames: int = Field(5, ge=1, description="Render after this many newly accepted subs ...")
    every_seconds: float = Field(
        300.0, gt=0, description="... or after this many seconds with new subs, whichever first."
    )
    products: list[Literal["preview", "denoised", "deconvolved"]] = Field(
        default_factory=lambda: ["preview", "denoised", "deconvolved"],
        description="Images to render; denoised and deconvolved also need their section enabled.",
    )
    gradient: Literal["polynomial", "rbf"] = Field(
        "polynomial", description="Background gradient model fitted to star-free samples."
    )
    gradient_order: int = Field(
        2, ge=1, le=4, description="Degree of the polynomial gradient model."
    )
    gradient_mode: Literal["subtract", "divide"] = Field(
        "subtract",
        description="subtract additive gradients (light pollution), divide multiplicative ones.",
    )
    target_snr: float = Field(
        50.0, gt=0, description="Median SNR at which the stack is reported as done."
    )
    stretch_midtone: float = Field(
        0.2, gt=0, lt=1, description="Target median brightness of the stretched preview, 0..1."
    )
    colour_stretch: Literal["linked", "unlinked"] = Field(
        "linked",
        description="Colour: one stretch for all channels (keeps colour), or one per channel.",
    )
    png_bits: Literal[8, 16] = Field(
        8, description="Sample depth of the PNG previews; 16 keeps faint steps for editing."
    )

    @field_validator("products")
    @classmethod
    def _products_once(cls, products: list[str]) -> list[str]:
        seen: set[str] = set()
        for product in products:
            if product in seen:
                raise _not_allowed("each product may be listed once", value=product)
            seen.add(product)
        return products


class DenoiseConfig(_Section):
    """The learned denoiser behind the denoised preview, run tile by tile to bound memory."""

    enabled: bool = Field(True, description="Produce the denoised preview.")
    model: ConfigPath | None = Field(
        None, description="Denoiser model file (.onnx); null uses the model shipped with subwatch."
    )
    strength: float = Field(
        0.8, ge=0, le=1, description="Blend of denoised over original, 0 = off, 1 = fully denoised."
    )
    tile: int = Field(
        512, ge=64, le=4096, description="Tile side in pixels (memory use grows with its square)."
    )
    overlap: int = Field(
        48, ge=0, description="Overlap between tiles in pixels, hides seams; below tile / 2."
    )
    threads: int = Field(2, ge=1, description="CPU threads for the denoiser.")

    @model_validator(mode="after")
    def _overlap_below_half_tile(self) -> DenoiseConfig:
        # Each tile must advance by tile - 2 * overlap pixels; at half a tile it would not move.
        limit = self.tile // 2
        if self.overlap >= limit:
            raise _not_allowed(f"must be < tile // 2 = {limit}", key="overlap", value=self.overlap)
        return self


class DeconvolutionConfig(_Section):
    """Regularised Richardson-Lucy deconvolution with the PSF measured from the stack's stars."""

    enabled: bool = Field(True, description="Produce the deconvolved preview.")
    max_iterations: int = Field(
        30,
        ge=1,
        le=500,
        description="Most Richardson-Lucy iterations (stops early on convergence).",
    )
    regularization: float = Field(
        0.002, ge=0, description="Total-variation weight; higher suppresses ringing and noise."
    )
    psf_grid: bool = Field(
        False, description="Fit a 3x3 grid of PSFs across the field instead of a single one."
    )
    psf_size: int = Field(
        25, ge=5, description="Side of the PSF model in pixels; odd, so the PSF has a centre."
    )

    @field_validator("psf_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise _not_allowed("must be odd")
        return value


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_LISTEN_HELP = "must be HOST:PORT such as 127.0.0.1:8750, 0.0.0.0:8750 or [::1]:8750"


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` into the host to bind (IPv6 without brackets) and the port.

    Raises ``ValueError`` with a message saying what is allowed. IPv6 addresses must be in
    brackets, as in URLs, because otherwise the port cannot be told from the address.
    """
    text = listen.strip()
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\]:(\d+)", text)
        if match is None:
            raise ValueError(f"an IPv6 address in brackets needs ':PORT' after; {_LISTEN_HELP}")
        host, port_text = match.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"'{host}' is not an IPv6 address; {_LISTEN_HELP}") from exc
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"the port is missing; {_LISTEN_HELP}")
        if not host:
            raise ValueError(f"the host is missing; {_LISTEN_HELP}")
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets; {_LISTEN_HELP}")
        if _HOSTNAME.fullmatch(host) is None:
            raise ValueError(f"'{host}' is not a host name or address; {_LISTEN_HELP}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be 1..65535; {_LISTEN_HELP}")
    return host, int(port_text)


class HttpConfig(_Section):
    """The built-in HTTP server: live page, JSON API and Prometheus metrics."""

    enabled: bool = Field(True, description="Serve the live page, API and metrics.")
    listen: str = Field(
        "127.0.0.1:8750",
        description="HOST:PORT to listen on; IPv6 as [::1]:8750; 0.0.0.0:8750 for all interfaces.",
    )
    token: str | None = Field(
        None,
        description="If set, API and metrics need 'Authorization: Bearer TOKEN' or ?token=TOKEN.",
    )

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        try:
            split_listen(value)
        except ValueError as exc:
            raise _not_allowed(str(exc)) from exc
        return value.strip()

    @field_validator("token")
    @classmethod
    def _non_empty_token(cls, value: str | None) -> str | None:
        # An empty token would make every request "authorised" with an empty bearer string.
        if value is not None and not value.strip():
            raise _not_allowed("must not be empty; write null to disable authentication")
        return value

    @property
    def host(self) -> str:
        """Host part of ``listen``, IPv6 without brackets, ready for ``socket.bind``."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """Port part of ``listen``."""
        return split_listen(self.listen)[1]


class LoggingConfig(_Section):
    """Log verbosity and format (text for a terminal, JSON lines for a log collector)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe level logged; lowercase is accepted."
    )
    format: Literal["text", "json"] = Field(
        "text", description="text for people, json for one JSON object per line."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


class Config(BaseModel):
    """The whole configuration: one attribute per section, every section defaulted."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    watch: WatchConfig = Field(default_factory=WatchConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    frames: FramesConfig = Field(default_factory=FramesConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    stacking: StackingConfig = Field(default_factory=StackingConfig)
    previews: PreviewsConfig = Field(default_factory=PreviewsConfig)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    deconvolution: DeconvolutionConfig = Field(default_factory=DeconvolutionConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # "stacking:" with every key below it commented out is YAML null; that is an empty
        # section, i.e. all defaults, not a type error.
        if isinstance(data, Mapping):
            return {
                key: ({} if value is None and key in cls.model_fields else value)
                for key, value in data.items()
            }
        return data


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user would recognise it from YAML: null/true/false, quoted strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        text = repr(value)
    elif isinstance(value, Path):
        text = repr(str(value))
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(annotation: Any) -> Any:
    """Strip ``X | None`` and ``Annotated[X, ...]`` down to ``X``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class _Where:
    """What a pydantic error location points at in the config tree."""

    def __init__(self, loc: tuple[str | int, ...]) -> None:
        self.path = ""
        self.parent: type[BaseModel] | None = None  # model owning the last key, if known
        self.field: FieldInfo | None = None  # the field itself, if the key is known
        self.annotation: Any = None  # type expected at this location
        model: type[BaseModel] | None = Config
        annotation: Any = Config
        for part in loc:
            if isinstance(part, int):
                self.path += f"[{part}]"
                inner = typing.get_args(_unwrap(annotation))
                annotation = inner[0] if inner else None
                model = annotation if _is_model(annotation) else None
                continue
            self.path = f"{self.path}.{part}" if self.path else str(part)
            self.parent = model
            if model is not None and part in model.model_fields:
                self.field = model.model_fields[part]
                annotation = _unwrap(self.field.annotation)
                model = annotation if _is_model(annotation) else None
            else:
                self.field, annotation, model = None, None, None
        self.annotation = annotation

    def choices(self) -> list[Any]:
        """The Literal values allowed here (also for the items of a list of Literals)."""
        annotation = _unwrap(self.annotation)
        if typing.get_origin(annotation) is list:
            annotation = _unwrap(typing.get_args(annotation)[0])
        if typing.get_origin(annotation) is Literal:
            return list(typing.get_args(annotation))
        return []

    def bounds(self) -> str:
        """The numeric range of the field, e.g. ``>= 1 and <= 500``, or '' when unbounded."""
        if self.field is None:
            return ""
        parts = []
        for item in self.field.metadata:
            for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                bound = getattr(item, attr, None)
                if isinstance(item, annotated_types.BaseMetadata) and bound is not None:
                    parts.append(
                        f"{symbol} {bound:g}" if isinstance(bound, float) else f"{symbol} {bound}"
                    )
        return " and ".join(parts)


_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
}


def _expected_kind(where: _Where) -> str:
    annotation = _unwrap(where.annotation)
    kind = _TYPE_WORDS.get(getattr(annotation, "__name__", ""), "")
    bounds = where.bounds()
    if kind in ("a whole number", "a number") and bounds:
        kind = f"{kind} {bounds}"
    return kind


def _problem(error: Mapping[str, Any]) -> tuple[tuple[str | int, ...], str, str, str]:
    """Turn one pydantic error into (location, key path, message, hint)."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc = tuple(error["loc"])
    value = error.get("input")
    if kind == _NOT_ALLOWED:
        if "key" in ctx:
            loc = (*loc, ctx["key"])
        if "value" in ctx:
            value = ctx["value"]
    where = _Where(loc)
    path = where.path or "(top level)"

    if kind in ("extra_forbidden", "invalid_key"):
        if kind == "invalid_key":  # a non-string key such as `1:`; the location ends in it
            loc = (*loc[:-1], str(loc[-1]))
            where = _Where(loc)
            path = where.path
        parent = where.parent
        allowed = list(parent.model_fields) if parent is not None else []
        message, hint = "unknown key", ""
        if allowed:
            message += f" (allowed: {', '.join(allowed)})"
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            if close:
                hint = f"did you mean '{close[0]}'?"
        return loc, path, message, hint
    if kind == "missing":
        return loc, path, "missing required key", ""
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return loc, path, f"expected a mapping, got {_show(value)}", ""
    if kind in ("list_type", "tuple_type", "set_type"):
        return loc, path, f"expected a list, got {_show(value)}", ""

    allowed = ""
    if kind == _NOT_ALLOWED:
        allowed = str(ctx.get("allowed", error.get("msg", "")))
    elif kind in ("literal_error", "enum"):
        choices = where.choices()
        allowed = "allowed: " + (
            ", ".join(repr(c) for c in choices) if choices else str(ctx.get("expected", ""))
        )
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = where.bounds()
        if not bounds:
            symbol = {
                "greater_than": ">",
                "greater_than_equal": ">=",
                "less_than": "<",
                "less_than_equal": "<=",
            }[kind]
            bounds = f"{symbol} {next(iter(ctx.values()), '?')}"
        allowed = f"must be {bounds}"
    elif kind == "finite_number":
        allowed = "must be a finite number"
    elif kind in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        allowed = f"must be {_expected_kind(where) or 'a whole number'}"
    elif kind in ("float_type", "float_parsing"):
        allowed = f"must be {_expected_kind(where) or 'a number'}"
    elif kind in ("bool_type", "bool_parsing"):
        allowed = "must be true or false"
    elif kind == "string_type":
        allowed = "must be a string"
        if isinstance(value, int | float | bool):
            allowed += "; put it in quotes"
    elif kind in ("path_type", "path_parsing"):
        allowed = "must be a path"
    elif kind == "too_short":
        allowed = f"must have at least {ctx.get('min_length', 1)} item(s)"
    else:
        allowed = str(error.get("msg", kind))
    return loc, path, f"{_show(value)} is not allowed ({allowed})", ""


def format_validation_error(
    err: ValidationError,
    source: str,
    *,
    lines: Mapping[tuple[str | int, ...], int] | None = None,
    key_names: Mapping[tuple[str | int, ...], str] | None = None,
) -> str:
    """Render every problem in ``err`` as ``SOURCE: key.path: message``, one line each.

    Pydantic's own text is written for programmers ("Input should be greater than 0"); the
    person reading this is editing a YAML file at the telescope, so each line names the dotted
    key path, the value as written in YAML, and what would have been accepted.

    ``lines`` maps a location (as in pydantic's ``loc``) to its line in the file, and adds
    ``, at line N`` where known (a suggestion for a misspelt key comes after it).
    ``key_names`` replaces a key path by another name, which lets errors in command-line
    overrides name the flag (``--http``) rather than ``http.listen``.
    """
    return "\n".join(text for _, text in _problem_lines(err, source, lines, key_names))


def _problem_lines(
    err: ValidationError,
    source: str,
    lines: Mapping[tuple[str | int, ...], int] | None = None,
    key_names: Mapping[tuple[str | int, ...], str] | None = None,
) -> list[tuple[int | None, str]]:
    out = []
    for error in err.errors():
        loc, path, message, hint = _problem(error)
        for key_loc, name in (key_names or {}).items():
            if tuple(loc[: len(key_loc)]) == tuple(key_loc):
                path = name
                break
        text = f"{source}: {path}: {message}"
        line = _line_of(loc, lines)
        if line is not None:
            text += f", at line {line}"
        if hint:
            text += f"; {hint}"
        out.append((line, text))
    return out


def _line_of(
    loc: tuple[str | int, ...], lines: Mapping[tuple[str | int, ...], int] | None
) -> int | None:
    # The deepest known prefix: an unknown key has its own line, a bad value inside a list
    # item its item's, a cross-field check falls back to its field or section.
    if not lines:
        return None
    for end in range(len(loc), 0, -1):
        line = lines.get(tuple(loc[:end]))
        if line is not None:
            return line
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _scan_nodes(
    node: yaml.Node | None,
    source: str,
    lines: dict[tuple[str | int, ...], int],
    problems: list[tuple[int | None, str]],
    loc: tuple[str | int, ...] = (),
) -> None:
    """Record the line of every key and list item, and report duplicate keys.

    PyYAML keeps the last of two equal keys without a word; in a config that means an edit
    further down the file silently wins over the one the user is looking at.
    """
    if node is None or len(loc) > 8:  # the schema is three levels deep; aliases can loop
        return
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            sub = (*loc, key)
            if key in seen:
                dotted = ".".join(str(p) for p in sub)
                problems.append(
                    (
                        line,
                        f"{source}: {dotted}: duplicate key (also at line {seen[key]}), "
                        f"at line {line}",
                    )
                )
            seen[key] = line
            lines[sub] = line  # the last occurrence is the one whose value is used
            _scan_nodes(value_node, source, lines, problems, sub)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*loc, index)] = item.start_mark.line + 1
            _scan_nodes(item, source, lines, problems, (*loc, index))


def _parse_yaml(
    text: str, source: str
) -> tuple[Any, dict[tuple[str | int, ...], int], list[tuple[int | None, str]]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if mark is not None:
            raise ConfigError(
                f"{source}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
            ) from exc
        raise ConfigError(f"{source}: invalid YAML: {what}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    lines: dict[tuple[str | int, ...], int] = {}
    problems: list[tuple[int | None, str]] = []
    _scan_nodes(node, source, lines, problems)
    return data, lines, problems


def load_config(path: Path | str | None) -> Config:
    """Read and validate a config file; ``None``, an empty file or empty sections mean defaults.

    Raises ``ConfigError`` for a missing or unreadable file, invalid YAML (with line and
    column), a top level that is not a mapping, duplicate keys, and every validation problem,
    all reported together so a broken file is fixed in one pass rather than one error per start.
    Relative paths in the file are resolved against the file's directory.
    """
    if path is None:
        return Config()
    file = Path(path).expanduser()
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: config file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{source}: is a directory, not a config file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc

    data, lines, problems = _parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"({', '.join(Config.model_fields)}), got {_show(data)}"
        )
    try:
        config = Config.model_validate(data, context={"base_dir": file.parent.absolute()})
    except ValidationError as exc:
        problems.extend(_problem_lines(exc, source, lines))
    if problems:
        # In file order, so the list reads top to bottom alongside the file.
        problems.sort(key=lambda item: float("inf") if item[0] is None else item[0])
        raise ConfigError([text for _, text in problems])
    return config


def _flag_path(value: Path | str) -> Path:
    # Command-line paths are relative to where the command was typed; make that explicit so
    # the daemon reports, and keeps using, the same folder whatever its working directory.
    return Path(os.path.abspath(Path(value).expanduser()))


def apply_overrides(
    cfg: Config,
    *,
    watch: Path | None = None,
    output: Path | None = None,
    calibration: Path | None = None,
    http: str | None = None,
) -> Config:
    """Return a new, validated Config with the given command-line values over ``cfg``.

    ``None`` leaves a value as the file (or default) set it. ``cfg`` is not modified. A bad
    value raises ``ConfigError`` naming the flag, e.g. ``command line: --http: ...``.
    """
    data = cfg.model_dump()
    if watch is not None:
        data["watch"]["path"] = _flag_path(watch)
    if output is not None:
        data["output"]["path"] = _flag_path(output)
    if calibration is not None:
        data["calibration"]["path"] = _flag_path(calibration)
    if http is not None:
        data["http"]["listen"] = http
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        names = {
            ("watch", "path"): "--watch",
            ("output", "path"): "--output",
            ("calibration", "path"): "--calibration",
            ("http", "listen"): "--http",
        }
        raise ConfigError(
            format_validation_error(exc, "command line", key_names=names).splitlines()
        ) from exc


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_HEADER = """\
subwatch configuration.

One YAML file, one mapping per section. Every key is optional: a missing key or section means
its default, and this file lists every key with its default value. Unknown keys are errors, so
a typo is reported rather than ignored. Command-line flags (--watch, --output, --calibration,
--http) override the values here.

Paths: '~' is expanded, and a relative path is taken relative to the directory of this file.
Durations are in seconds, sizes in pixels, temperatures in degrees Celsius. Check an edited
file with the check-config command before a night out."""

_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")


def _yaml_value(value: Any) -> str:
    """One value in YAML flow form that reads back as exactly the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # Quote anything YAML would read as something else ('*' starts an alias, 'no' is false).
        if _PLAIN.fullmatch(value) and yaml.safe_load(value) == value:
            return value
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as YAML")


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, width=100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
    ) or [f"{indent}#"]


def render_config_yaml(cfg: Config, *, show_secrets: bool = False) -> str:
    """Render ``cfg`` as a commented YAML file that loads back to the same values.

    Comments come from the models (section docstrings, key descriptions, Literal choices), so
    the rendered file documents exactly what this version of subwatch accepts. ``http.token``
    is replaced by a placeholder unless ``show_secrets``, so the output is safe to log or share.
    """
    out: list[str] = []
    for paragraph in _HEADER.split("\n\n"):
        out.extend(_comment(" ".join(paragraph.split()), ""))
        out.append("#")
    out.pop()
    for section_name, section_field in Config.model_fields.items():
        model = _unwrap(section_field.annotation)
        section = getattr(cfg, section_name)
        summary = (model.__doc__ or "").strip().split("\n\n")[0]
        out.append("")
        out.extend(_comment(" ".join(summary.split()), ""))
        out.append(f"{section_name}:")
        for key, field in model.model_fields.items():
            out.extend(_comment(field.description or "", "  "))
            value = getattr(section, key)
            if (section_name, key) == ("http", "token") and value is not None and not show_secrets:
                value = "<hidden>"
            line = f"  {key}: {_yaml_value(value)}"
            choices = _Where((section_name, key)).choices()
            if choices:
                line += "  # " + ("any of: " if isinstance(value, list) else "")
                line += " | ".join(str(c) for c in choices)
            out.append(line)
    return "\n".join(out) + "\n"


def default_config_yaml() -> str:
    """The default configuration as commented YAML: the text of the shipped config file."""
    return render_config_yaml(Config())


if __name__ == "__main__":  # regenerate the shipped file: python -m subwatch.config > FILE
    print(default_config_yaml(), end="")
