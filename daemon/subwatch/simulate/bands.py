"""A six-number spectrum: enough colour to make filters, Bayer sites and emission behave.

Every source is described by how much of its light falls in three broad continuum bands
(blue, green, red) plus three emission lines (H-alpha, [O III], [S II]); every filter or Bayer
site by how much of each of those six it passes. A broadband filter passes a whole continuum
band, a 3-7 nm narrowband filter passes its line and only a sliver (about 2 %) of the
continuum around it. That one dot product is why narrowband frames have a sky and stars tens
of times fainter while the nebula barely fades, and why the R and B sites of a colour sensor
see a red nebula differently. All numbers are relative to the luminance (L) filter, whose
response is one everywhere, so a rate "in L" is the natural unit of the scene.
"""

from __future__ import annotations

import numpy as np

# Order of the six components in every vector below.
COMPONENTS = ("cont_b", "cont_g", "cont_r", "ha", "oiii", "sii")

FILTERS: dict[str, np.ndarray] = {
    "L": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    "R": np.array([0.0, 0.05, 0.95, 0.95, 0.0, 0.95]),
    "G": np.array([0.05, 0.95, 0.05, 0.0, 0.9, 0.0]),
    "B": np.array([0.95, 0.05, 0.0, 0.0, 0.3, 0.0]),
    "Ha": np.array([0.0, 0.0, 0.02, 0.9, 0.0, 0.0]),
    "OIII": np.array([0.01, 0.02, 0.0, 0.0, 0.9, 0.0]),
    "SII": np.array([0.0, 0.0, 0.02, 0.0, 0.0, 0.9]),
}

# Bayer sites of a colour sensor: broad, overlapping dyes times the silicon's quantum
# efficiency, which peaks in the green. Index 0, 1, 2 = R, G, B sites.
OSC_SITES: tuple[np.ndarray, ...] = (
    0.75 * np.array([0.02, 0.08, 0.90, 0.90, 0.03, 0.90]),
    1.00 * np.array([0.10, 0.85, 0.10, 0.05, 0.65, 0.05]),
    0.65 * np.array([0.85, 0.12, 0.03, 0.02, 0.45, 0.02]),
)

# Spectra (as fractions of the L flux) of the sky glow and of a flat panel.
SKY_SPECTRUM = np.array([0.25, 0.33, 0.42, 0.0, 0.0, 0.0])  # sodium/LED light pollution
PANEL_SPECTRUM = np.array([0.32, 0.36, 0.32, 0.0, 0.0, 0.0])  # a near-white panel
NEUTRAL_SPECTRUM = np.array([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 0.0])  # sunlight off a satellite

# Filter aliases as capture programs spell them.
_ALIASES = {
    "l": "L",
    "lum": "L",
    "luminance": "L",
    "clear": "L",
    "r": "R",
    "red": "R",
    "g": "G",
    "green": "G",
    "b": "B",
    "blue": "B",
    "ha": "Ha",
    "h-alpha": "Ha",
    "halpha": "Ha",
    "h": "Ha",
    "oiii": "OIII",
    "o3": "OIII",
    "o": "OIII",
    "sii": "SII",
    "s2": "SII",
    "s": "SII",
}


def canonical_filter(name: str) -> str:
    """The filter's canonical spelling; raises ``ValueError`` on an unknown filter."""
    key = name.strip()
    if key in FILTERS:
        return key
    found = _ALIASES.get(key.lower())
    if found is None:
        raise ValueError(f"unknown filter {name!r}; known: {', '.join(FILTERS)}")
    return found


def responses(band: str | int, osc: bool) -> np.ndarray:
    """The six-component response of a mono filter, or of Bayer site ``band`` (0=R 1=G 2=B)."""
    if osc:
        return OSC_SITES[int(band)]
    return FILTERS[str(band)]


def star_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 6) spectra of stars from red dwarfs to hot blue stars; no line emission.

    A single colour index ``t`` moves light from the red to the blue band, which keeps the
    L flux (the sum) at one so the flux function is defined in L.
    """
    t = rng.beta(2.0, 2.0, n)
    blue = 0.22 + 0.20 * t
    red = 0.45 - 0.20 * t
    green = 1.0 - blue - red
    spectra = np.zeros((n, 6))
    spectra[:, 0], spectra[:, 1], spectra[:, 2] = blue, green, red
    return spectra
