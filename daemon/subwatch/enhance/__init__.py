"""Enhancement: what turns a linear stack into something to look at, and into numbers about it.

The per-frame path ends with a linear stack (``subwatch.stack``). Every few subs, off that path,
the stack is looked at as a whole, in this order:

* **gradient** (``fit_gradient``, ``remove_gradient``): the sky's smooth glow (light pollution,
  moon, flats that missed vignetting) is modelled on star-free samples and removed, so a
  stretch shows the object rather than the sky's slope.
* **snr** (``stack_snr_report``): the stack's measured signal-to-noise and noise, compared
  with what its subs promise (noise falling as 1/sqrt(N)), and the integration still needed
  to reach a target SNR.
* **psf** (``measure_psf``) and **deconvolve** (``deconvolve``): the stack's own stars give the
  point-spread function; regularised Richardson-Lucy sharpens with it and stops before it
  amplifies noise.
* **denoise** (``Denoiser``, ``DenoiseSettings``): a small network shipped with subwatch, run
  with onnxruntime on the variance-stabilised deconvolved stack, tile by tile.
* **stretch** (``auto_stretch``, ``neutralise_colour``, ``write_png``): a linear image is
  almost black on a screen; a midtone transfer sets the sky at a chosen brightness.
* **previews** (``make_previews``): the cycle above as one call, writing ``preview.png``,
  ``deconvolved.png``/``.fits``, ``denoised.png``/``.fits``, ``background.fits``,
  ``snr.fits`` and returning the numbers for ``status.json``; **composite**
  (``make_composite``) puts a target's filter stacks together as RGB, SHO or HOO.

The same cycle serves the daemon's preview worker and ``subwatch enhance`` on any linear FITS
(``enhance.cli``). Each step is a function over numpy arrays usable on its own; names are
imported on first use, so importing the package costs nothing until a step is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fit_gradient": "gradient",
    "remove_gradient": "gradient",
    "GradientModel": "gradient",
    "stack_snr_report": "snr",
    "measure_psf": "psf",
    "PSFModel": "psf",
    "deconvolve": "deconvolve",
    "Denoiser": "denoise",
    "DenoiseSettings": "denoise",
    "auto_stretch": "stretch",
    "neutralise_colour": "stretch",
    "write_png": "stretch",
    "make_previews": "previews",
    "PreviewOptions": "previews",
    "PreviewRequest": "previews",
    "PreviewRenderer": "previews",
    "StackSnapshot": "previews",
    "make_composite": "composite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'subwatch.enhance' has no attribute {name!r}")
    return getattr(importlib.import_module(f"subwatch.enhance.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
