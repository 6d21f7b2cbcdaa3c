"""Star-based registration: which transform puts this sub's stars on the reference's stars?

The method, in plain words:

* **Asterisms.** Take the brightest stars of each list (``max_stars``, 60 by default) and form
  small triangles: each star with two of its nearest neighbours. A triangle's *shape* is the same
  in both frames however the sub is shifted, rotated (any angle, including the 180 degrees of a
  meridian flip) or slightly rescaled.
* **Invariants.** Each triangle is described by the ratios of its sorted sides (shortest/longest,
  middle/longest) and its handedness. Equal descriptors mean "probably the same three stars", and
  the canonical vertex order says which star is which. Descriptors are matched with a KD-tree.
* **Robust estimator.** Every matched triangle pair proposes a similarity transform. Proposals
  are tried in order of how many other triangles back their star pairs, plus a seeded random
  sample of the rest (RANSAC); each is scored by how many bright stars it lands on a reference
  star. Spurious detections (cosmic rays, hot pixels) only add losing proposals.
* **Refinement.** The few best distinct proposals are refined: match *all* stars by mutual
  nearest neighbour within ``match_radius`` px, fit the transform by least squares on every pair
  (similarity, or affine when asked), drop residual outliers, re-match, repeat until stable. The
  candidate explaining most (flux-weighted) stars wins. Hot pixels sit at identical coordinates
  in both lists and so vote for the identity: passing fluxes lets these faint defects lose to
  real stars, and pairs that the identity explains better than the fit are split off when a
  small dither would otherwise blend the two explanations.
* **Never silently wrong.** Too few matched stars (``min_inliers``), an RMS residual above
  ``max_rms`` px, or no more matches than chance coincidence: ``RegistrationError`` is raised with
  ``inliers`` and ``rms`` so the caller can report ``registration failed`` instead of stacking a
  smeared sub.

Convention (contract): a 2x3 matrix ``M`` maps pixel ``(x, y)`` of the sub (0-based, ``x`` =
column, ``y`` = row, pixel centres at integer coordinates) into the reference grid:
``[xr, yr] = M[:, :2] @ [x, y] + M[:, 2]``. ``warp_image`` takes the same matrix.

Verbs: ``find_transform``, ``apply_transform``, ``invert_transform``, ``warp_image``,
``transform_error``.
"""

from subwatch.register.fit import MODELS, Registration, RegistrationError, find_transform
from subwatch.register.transforms import (
    apply_transform,
    invert_transform,
    rotation_scale,
    transform_error,
)
from subwatch.register.warp import INTERPOLATIONS, warp_image

__all__ = [
    "INTERPOLATIONS",
    "MODELS",
    "Registration",
    "RegistrationError",
    "apply_transform",
    "find_transform",
    "invert_transform",
    "rotation_scale",
    "transform_error",
    "warp_image",
]
