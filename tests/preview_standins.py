"""Stand-in render functions for the preview process tests.

They live in a module of their own, with nothing heavy to import, because a spawned preview
process imports the module of the factory it is given.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from subwatch.enhance.previews import PreviewRequest


def describe_factory():
    """Reports what the process received; n_frames 13 raises, 66 kills the process."""

    def render(request: PreviewRequest) -> dict[str, Any]:
        image = request.snapshot.image
        if request.snapshot.n_frames == 13:
            raise ValueError("unlucky stack")
        if request.snapshot.n_frames == 66:
            os._exit(3)  # a crash of the process itself (a segfault, the OOM killer)
        return {
            "pid": os.getpid(),
            "nice": os.nice(0),
            "shape": list(image.shape),
            "sum": float(np.nansum(image, dtype=np.float64)),
            "nan": int(np.isnan(image).sum()),
        }

    return render
