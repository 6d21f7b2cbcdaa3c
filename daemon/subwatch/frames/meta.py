"""One description of a frame, whatever dialect its header speaks.

Capture programs disagree on almost every keyword: the frame type lives in IMAGETYP (N.I.N.A.,
SGP, SharpCap: ``Light Frame``, ``LIGHT``, ``light``), in FRAME (INDI/Ekos: ``Light``) or
nowhere (ASIImg writes no type at all and relies on the file name ``Bias_ASIImg_...``);
exposure is EXPTIME or EXPOSURE (or EXPOINUS in microseconds), sometimes with a decimal comma;
temperature is CCD-TEMP, TEMPERAT or SENSOR-T. ``normalise_header`` reads all of them into a
``FrameMeta`` and records in ``sources`` where each value came from, so a value guessed from a
file name is visible in ``frames.jsonl``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from astropy.io import fits

KINDS = ("light", "bias", "dark", "flat", "dark-flat")

# Header spellings, lower-cased, without punctuation runs, mapped to our kinds.
_KIND_WORDS: list[tuple[str, str]] = [
    ("darkflat", "dark-flat"),
    ("dark flat", "dark-flat"),
    ("flatdark", "dark-flat"),
    ("flat dark", "dark-flat"),
    ("bias", "bias"),
    ("offset", "bias"),
    ("zero", "bias"),
    ("dark", "dark"),
    ("flat", "flat"),
    ("light", "light"),
    ("object", "light"),
    ("science", "light"),
]

_NAME_KIND = re.compile(
    r"(?<![a-z])"
    r"(dark[ _-]?flats?|flat[ _-]?darks?|bias(?:es)?|offsets?|darks?|flats?|lights?)"
    r"(?![a-z])"
)
_NAME_EXPOSURE = re.compile(r"(?<![a-z0-9.])(\d+(?:[.,]\d+)?)\s*(ms|msec|s|sec|secs)(?![a-z])")
_BAYER = {"RGGB", "BGGR", "GRBG", "GBRG"}


@dataclass
class FrameMeta:
    """Normalised metadata; ``None`` means unknown, never a made-up default."""

    path: str
    kind: str = "unknown"
    exptime: float | None = None
    gain: float | None = None
    offset: float | None = None
    temperature: float | None = None
    binning: int = 1
    filter: str | None = None
    target: str | None = None
    bayer: str | None = None
    instrument: str | None = None
    date_obs: str | None = None
    ra: float | None = None  # pointing, degrees (J2000 as written by the capture program)
    dec: float | None = None
    width: int = 0
    height: int = 0
    channels: int = 1
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def is_color(self) -> bool:
        return self.channels == 3 or self.bayer is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(header: fits.Header, *keys: str) -> tuple[str | None, str | None]:
    for key in keys:
        if key in header:
            try:
                value = header[key]
            except Exception:
                continue
            if value is None:
                continue
            text = str(value).strip()
            if text:
                return text, key
    return None, None


def _number(header: fits.Header, *keys: str) -> tuple[float | None, str | None]:
    """Read a number leniently: decimal commas and stray quotes are common in the field."""
    for key in keys:
        if key not in header:
            continue
        try:
            raw = header[key]
        except Exception:
            raw = _raw_card_value(header, key)
        if isinstance(raw, bool) or raw is None:
            continue
        if isinstance(raw, int | float):
            return float(raw), key
        text = str(raw).strip().strip("'").replace(",", ".")
        try:
            return float(text), key
        except ValueError:
            continue
    return None, None


def _raw_card_value(header: fits.Header, key: str) -> str | None:
    try:
        card = header.cards[key]
        image = card.image
    except Exception:
        return None
    return image[10:].split("/", 1)[0].strip()


def _kind_from_text(text: str) -> str | None:
    norm = re.sub(r"[^a-z]+", " ", text.lower()).strip()
    for word, kind in _KIND_WORDS:
        if word in norm:
            return kind
    return None


def _kind_from_path(path: Path, root: Path | None) -> str | None:
    """Folder and file names, innermost first: ``Flat_...`` in a ``darks/`` folder is a flat."""
    parts = [path.name]
    parent = path.parent
    while parent != parent.parent and (root is None or parent != root):
        parts.append(parent.name)
        parent = parent.parent
        if root is None and len(parts) > 3:
            break
    for part in parts:
        match = _NAME_KIND.search(part.lower())
        if match:
            word = match.group(1).replace(" ", "").replace("_", "").replace("-", "")
            if word.startswith(("darkflat", "flatdark")):
                return "dark-flat"
            for prefix, kind in (
                ("bias", "bias"),
                ("offset", "bias"),
                ("dark", "dark"),
                ("flat", "flat"),
                ("light", "light"),
            ):
                if word.startswith(prefix):
                    return kind
    return None


def _exposure_from_name(path: Path) -> float | None:
    for part in (path.name, path.parent.name):
        match = _NAME_EXPOSURE.search(part.lower())
        if match:
            value = float(match.group(1).replace(",", "."))
            return value / 1000.0 if match.group(2).startswith("ms") else value
    return None


_OLD_FITS_DATE = re.compile(r"^(\d{2})/(\d{2})/(\d{2})$")  # dd/mm/yy, FITS before 1999


def parse_date(text: str | None) -> datetime | None:
    """A UTC time from the date strings found in real headers, or None.

    Seen in the wild: ISO with ``T`` or a space, a trailing ``Z``, any number of fractional
    digits (up to 7 from some drivers), a date alone, and the pre-1999 ``dd/mm/yy`` form.
    """
    if not text:
        return None
    cleaned = text.strip().strip("'").strip().rstrip("Z").replace(" ", "T")
    old = _OLD_FITS_DATE.match(cleaned)
    if old:
        day, month, year = (int(g) for g in old.groups())
        try:
            return datetime(1900 + year if year >= 50 else 2000 + year, month, day, tzinfo=UTC)
        except ValueError:
            return None
    if "." in cleaned:
        head, frac = cleaned.split(".", 1)
        cleaned = f"{head}.{frac[:6]}"
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(cleaned, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def _parse_date(text: str | None) -> str | None:
    dt = parse_date(text)
    return dt.isoformat().replace("+00:00", "Z") if dt else None


def normalise_header(
    header: fits.Header,
    path: Path,
    *,
    root: Path | None = None,
    shape: tuple[int, ...] = (),
) -> FrameMeta:
    """Build a ``FrameMeta`` from a header, with file and folder names as the fallback."""
    path = Path(path)
    rel = (
        str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)
    )
    meta = FrameMeta(path=rel)
    src = meta.sources

    type_text, key = _text(header, "IMAGETYP", "FRAME", "FRAMETYP", "SUBTYPE", "SUB_TYPE")
    kind = _kind_from_text(type_text) if type_text else None
    if kind:
        meta.kind, src["kind"] = kind, f"header:{key}"
    elif type_text:
        # A type we do not know (a model, a master, a test pattern) is not guessed at.
        meta.kind, src["kind"] = "unknown", f"header:{key}={type_text}"
    else:
        kind = _kind_from_path(path, root)
        if kind:
            meta.kind, src["kind"] = kind, "filename"

    exptime, key = _number(header, "EXPTIME", "EXPOSURE")
    if exptime is None:
        micro, key = _number(header, "EXPOINUS")
        exptime = micro / 1e6 if micro is not None else None
    if exptime is not None:
        meta.exptime, src["exptime"] = exptime, f"header:{key}"
    else:
        guess = _exposure_from_name(path)
        if guess is not None:
            meta.exptime, src["exptime"] = guess, "filename"

    meta.gain, _ = _number(header, "GAIN", "EGAIN_SETTING")
    meta.offset, _ = _number(header, "OFFSET", "BLKLEVEL")
    meta.temperature, _ = _number(header, "CCD-TEMP", "CCD_TEMP", "SENSOR-T", "TEMPERAT", "CCDTEMP")
    binning, _ = _number(header, "XBINNING", "BINNING", "XBIN")
    meta.binning = int(binning) if binning else 1

    filt, key = _text(header, "FILTER", "FILTER1", "FILTNAME")
    if filt:
        meta.filter, src["filter"] = filt, f"header:{key}"
    target, key = _text(header, "OBJECT", "OBJNAME", "TARGET")
    if target and target.lower() not in ("unknown", "none", ""):
        meta.target, src["target"] = target, f"header:{key}"

    bayer, _ = _text(header, "BAYERPAT", "COLORTYP", "CFA-PAT")
    if bayer and bayer.upper() in _BAYER:
        meta.bayer = _bayer_with_offsets(bayer.upper(), header)
    meta.instrument, _ = _text(header, "INSTRUME", "CAMERA")
    meta.ra, meta.dec = _pointing(header)
    date_text, _ = _text(header, "DATE-OBS", "DATE-STA", "DATE")
    meta.date_obs = _parse_date(date_text)

    if len(shape) >= 2:
        meta.height, meta.width = int(shape[0]), int(shape[1])
        meta.channels = int(shape[2]) if len(shape) == 3 else 1
    if meta.channels == 3:
        meta.bayer = None
    return meta


def _sexagesimal(text: str, hours: bool) -> float | None:
    """'19 59 41.99' or '19:59:41.99' (hours for RA) or '+22 43 19.4' to degrees."""
    parts = re.split(r"[\s:hdms°'\"]+", text.strip().replace(",", "."))
    parts = [p for p in parts if p]
    if not 1 <= len(parts) <= 3:
        return None
    try:
        sign = -1.0 if parts[0].startswith("-") else 1.0
        values = [abs(float(parts[0]))] + [float(p) for p in parts[1:]]
    except ValueError:
        return None
    value = values[0] + sum(v / 60.0**i for i, v in enumerate(values[1:], start=1))
    return sign * value * (15.0 if hours else 1.0)


def _pointing(header: fits.Header) -> tuple[float | None, float | None]:
    """Where the telescope pointed: RA/DEC in degrees, OBJCTRA/OBJCTDEC, or a solved WCS."""
    ra, _ = _number(header, "RA")
    dec, _ = _number(header, "DEC")
    if ra is not None and dec is not None and -90 <= dec <= 90:
        return ra % 360.0, dec
    ra_text, _ = _text(header, "OBJCTRA")
    dec_text, _ = _text(header, "OBJCTDEC")
    if ra_text and dec_text:
        ra_deg, dec_deg = _sexagesimal(ra_text, hours=True), _sexagesimal(dec_text, hours=False)
        if ra_deg is not None and dec_deg is not None:
            return ra_deg % 360.0, dec_deg
    ra, _ = _number(header, "CRVAL1")
    dec, _ = _number(header, "CRVAL2")
    if ra is not None and dec is not None and -90 <= dec <= 90:
        return ra % 360.0, dec
    return None, None


def separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance between two pointings, degrees (haversine: fine at tiny angles)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    a = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(a))))


def _bayer_with_offsets(pattern: str, header: fits.Header) -> str:
    """Shift the 2x2 pattern by XBAYROFF/YBAYROFF and flip it for N.I.N.A.'s bottom-up rows.

    The pattern names the colours of pixels (0,0) (1,0) (0,1) (1,1); an x offset of one swaps
    the columns, a y offset (or ROWORDER = BOTTOM-UP on an odd height) swaps the rows.
    """
    xoff, _ = _number(header, "XBAYROFF", "BAYOFFX")
    yoff, _ = _number(header, "YBAYROFF", "BAYOFFY")
    grid = [[pattern[0], pattern[1]], [pattern[2], pattern[3]]]
    if xoff and int(xoff) % 2:
        grid = [[row[1], row[0]] for row in grid]
    if yoff and int(yoff) % 2:
        grid = [grid[1], grid[0]]
    roworder, _ = _text(header, "ROWORDER")
    height = header.get("NAXIS2", 0)
    if roworder and roworder.upper() == "BOTTOM-UP" and isinstance(height, int) and height % 2:
        grid = [grid[1], grid[0]]
    return "".join(grid[0] + grid[1])
