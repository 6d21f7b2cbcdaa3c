"""Synthetic nights at the telescope, with the answers written down.

A pipeline that calibrates, measures, registers and stacks can only be tested against data
whose truth is known, and real data never comes with it. This package therefore builds a
night from physics and keeps every answer.

The method, in plain words. First a sky is made in one fixed coordinate system, the pixel
grid of the first light (the reference): a few thousand stars with a power-law brightness
distribution, scattered over an area larger than the frame, and an emission nebula made of
fractal noise at several scales under soft envelopes. Then a camera is made: a bias pedestal
with column and row structure, dark current with hot pixels, vignetting and dust donuts in
the flat field, read noise, gain and full well. Then the night is planned: for every light a
dither, a small rotation (and 180 degrees after a meridian flip), the seeing, the sky glow and
any accident (satellite trail, cosmic rays, a cloud, a guiding failure, lost focus). Each
light is rendered by mapping the reference sky into the frame through its exact affine
transform: star stamps are placed at the mapped positions, the nebula is resampled through
the same matrix. The sky glow, flat field and noise are added in the frame's own pixels, the
way a camera adds them, and the result is clipped at the full well and quantised to 16 bits.
Calibration frames come from the same camera, so calibrating with them really removes what
the camera put in.

Everything is determined by the seed. ``truth.json`` records, for every light, the matrix
that maps its pixels onto the reference, its seeing and defects and whether a good pipeline
should stack or reject it; ``truth_sky.fits`` is the noiseless reference sky.

Verbs::

    simulate_session(SimOptions(out=Path("night"), lights=8))   # writes files, returns truth
    add_arguments(parser); run_cli(parser.parse_args())        # the command line
"""

from subwatch.simulate.cli import add_arguments, run_cli
from subwatch.simulate.session import SimOptions, Simulation, simulate_session

__all__ = ["SimOptions", "Simulation", "add_arguments", "run_cli", "simulate_session"]
