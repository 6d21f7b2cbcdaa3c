"""subwatch: an acquisition-side live stacking daemon for astrophotography.

It watches the folder a capture program writes into and, for every new sub-exposure, calibrates
it, measures it, judges it, registers it and adds it to a live stack per target and filter. The
package is a set of plain functions over numpy arrays (``frames``, ``calibration``, ``measure``,
``register``, ``stack``) driven by a small service layer (``service``); ``simulate`` writes
physically grounded synthetic nights used by the demo and the tests.
"""

__version__ = "0.1.0"
