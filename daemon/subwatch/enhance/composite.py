"""Colour composites of one target from its filter stacks: RGB, or SHO / HOO for narrowband.

A target shot through R, G and B (or Ha, OIII and SII) has one stack per filter, and each
stack has its own reference sub: the stacks are not on one pixel grid (the filter wheel turns
between them, the mount re-centres, a meridian flip rotates one by 180 degrees). So each
channel's stars are matched to the first channel's (``subwatch.register.find_transform``),
the channel is warped onto that grid, and each is
stretched on its own (which also balances the colours, as a preview should) before the three
are put together:

* **RGB**: R, G, B as they are.
* **SHO** (the "Hubble palette"): SII red, Ha green, OIII blue.
* **HOO**: Ha red, OIII green and blue (two filters are enough).

The stars are those of each stack's reference sub (``measure_frame`` on a calibrated sub,
the list every sub of the stack was registered with, in the stack's own grid); stars
detected again on a stack are fewer per filter than they look (nebula knots left by the
gradient removal count among them) and matched less often. Without a reference list the
stars are measured on the channel's image.

Filter names are read loosely (``Red``, ``H-alpha``, ``O3`` ...). Channels that cannot be
registered are left out with a log line; with fewer than a palette needs, nothing is written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Canonical filter names and the spellings capture programs use for them.
_ALIASES = {
    "R": ("r", "red"),
    "G": ("g", "green"),
    "B": ("b", "blue"),
    "Ha": ("ha", "halpha", "h-alpha", "h_alpha", "h-a", "hydrogen-alpha", "h"),
    "OIII": ("oiii", "o3", "o-iii", "o_iii", "o"),
    "SII": ("sii", "s2", "s-ii", "s_ii", "s"),
}
_CANON = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}

# Palettes, tried in order: (name, (red, green, blue) filters).
PALETTES: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("RGB", ("R", "G", "B")),
    ("SHO", ("SII", "Ha", "OIII")),
    ("HOO", ("Ha", "OIII", "OIII")),
)


def canonical_filter(name: str) -> str | None:
    """``R``, ``G``, ``B``, ``Ha``, ``OIII``, ``SII`` for a filter name, else None."""
    key = re.sub(r"\s+", "", name.strip().lower())
    return _CANON.get(key)


def choose_palette(filters: list[str]) -> tuple[str, dict[str, str]] | None:
    """The first palette the filters allow, and its canonical -> actual filter names."""
    have: dict[str, str] = {}
    for f in filters:
        canon = canonical_filter(f)
        if canon is not None and canon not in have:
            have[canon] = f
    for name, channels in PALETTES:
        if all(c in have for c in channels):
            return name, {c: have[c] for c in channels}
    return None


@dataclass
class Channel:
    """One filter's gradient-free linear stack (mono, NaN where no data) and its stars."""

    filter: str
    image: np.ndarray
    stars: np.ndarray | None = None  # (N, 4) x, y, flux, sigma; measured when not given


def _stars(channel: Channel) -> np.ndarray:
    from subwatch.measure import measure_frame

    if channel.stars is None:
        img = np.nan_to_num(channel.image, nan=float(np.nanmedian(channel.image)))
        channel.stars = measure_frame(img).stars.xyfs()
    return channel.stars


def register_channels(channels: list[Channel]) -> list[np.ndarray | None]:
    """Each channel on the first channel's grid (None for one that could not be matched)."""
    from subwatch.register import RegistrationError, find_transform, warp_image

    ref = channels[0]
    shape = ref.image.shape[:2]
    out: list[np.ndarray | None] = [ref.image]
    for ch in channels[1:]:
        try:
            reg = find_transform(_stars(ch), _stars(ref))
        except RegistrationError as exc:
            log.warning("composite: %s not registered to %s: %s", ch.filter, ref.filter, exc)
            out.append(None)
            continue
        img = np.nan_to_num(ch.image, nan=0.0)
        warped, coverage = warp_image(img, reg.matrix, shape, "cubic")
        warped[~coverage] = np.nan
        out.append(warped)
    return out


def make_composite(
    channels: dict[str, Channel],
    stretch: Callable[[np.ndarray], np.ndarray],
) -> tuple[str, np.ndarray] | None:
    """The palette name and the (H, W, 3) stretched composite, or None if no palette fits.

    ``channels`` maps filter name -> channel, in the order the stacks were first seen (the
    first is the registration reference); ``stretch`` maps a linear mono image to 0..1.
    """
    chosen = choose_palette(list(channels))
    if chosen is None:
        return None
    palette, names = chosen
    order = [f for f in channels if f in names.values()]
    registered = dict(zip(order, register_channels([channels[f] for f in order]), strict=True))
    planes = []
    for canon in dict(PALETTES)[palette]:
        image = registered[names[canon]]
        if image is None:
            return None
        bad = ~np.isfinite(image)
        filled = np.where(bad, np.nanmedian(image), image).astype(np.float32)
        plane = np.asarray(stretch(filled), np.float32)
        plane[bad] = 0.0
        planes.append(plane)
    return palette, np.stack(planes, axis=2)


def write_composite(
    path: Path,
    channels: dict[str, Channel],
    stretch: Callable[[np.ndarray], np.ndarray],
    *,
    bits: int = 8,
) -> str | None:
    """Write ``composite.png`` (``bits`` per sample) when the channels allow a palette;
    returns the palette name."""
    from subwatch.enhance.stretch import write_png

    made = make_composite(channels, stretch)
    if made is None:
        return None
    palette, rgb = made
    write_png(path, rgb, bits=bits)
    return palette
