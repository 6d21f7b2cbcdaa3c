"""Prometheus metrics: every series subwatch exports, declared once, with fixed label sets.

The daemon is watched from Grafana for a whole night, so what it exports has to stay small and
stable: a series per label combination lives in Prometheus for weeks. Three rules follow.

- **Labels are bounded vocabularies.** ``kind``, ``status`` and ``reason`` of
  ``subwatch_frames_total`` come from the short codes the pipeline writes to ``frames.jsonl``
  (``clouds``, ``trailed``, ``bad header`` ...). A reason that is not one of them (a free-text
  error, or a code with details appended such as ``truncated (12 of 50 MB)``) is mapped to its
  known prefix or to ``other``, so a night of odd files cannot create a series per file. File
  names are never labels; ``target`` and ``filter`` appear only on stack and last-frame series,
  which grow with the number of stacks, not frames.
- **Base units and Prometheus names**: ``_total`` for counters, ``_seconds`` and ``_pixels`` and
  ``_adu`` in the name, timings as histograms so quantiles can be taken over any window.
- **An own registry** (``Metrics().registry``), not the process-global one, so tests and several
  daemons in one process never collide, and ``render`` serves exactly these series.

``Metrics`` is fed by the daemon: ``observe_row`` with each journal row as it is written,
``observe_stack`` with each stack's ``status.json`` document, ``set_queue_depth`` and
``observe_preview`` from the workers. Everything is thread-safe (prometheus_client's metrics
lock internally), so the HTTP thread can ``render`` while the worker observes.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from subwatch import __version__

__all__ = [
    "FRAME_KINDS",
    "FRAME_REASONS",
    "FRAME_STATUSES",
    "Metrics",
    "bounded_reason",
]

FRAME_KINDS = ("light", "bias", "dark", "flat", "dark-flat", "unknown")
FRAME_STATUSES = (
    "stacked",
    "rejected",
    "error",
    "calibration",
    "waiting",
    "incomplete",
    "duplicate",
)

# Gate reasons first (what a user sees most), then the error codes of the readers, the scanner
# and the pipeline. A reason that starts with one of these (``truncated (...)``,
# ``unknown frame type 'x'``) is counted under it.
GATE_REASONS = (
    "too few stars",
    "trailed",
    "saturated",
    "defocused",
    "clouds",
    "registration failed",
)
FRAME_REASONS = (
    *GATE_REASONS,
    "changed after it was stacked",
    "changed after stacking",
    "already stacked",
    "same content",
    "waiting for data",
    "unknown frame type",
    "not a FITS file",
    "not an XISF file",
    "bad header",
    "no image",
    "no valid pixels",
    "unreadable",
    "unsupported format",
    "unsupported image",
    "absurd dimensions",
    "missing",
    "incomplete",
    "truncated",
    "out of memory",
    "internal error",
)
OTHER = "other"
# Codes written with a detail after them whose label reads better without a dangling word.
_PREFIXES = {"already stacked as": "already stacked", "same content as": "same content"}

# Stages of a row's ``seconds``; anything else the pipeline may time is counted as ``other``.
STAGES = ("load", "calibrate", "measure", "judge", "register", "warp", "integrate", "total")

# A frame stage takes from a few milliseconds (judge) to seconds (a 26 MP warm-up flush).
FRAME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Previews: a stretch of a small stack in tens of ms, denoise of 26 MP in a minute or two.
PREVIEW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_PRODUCT = re.compile(r"[a-z][a-z0-9_-]{0,31}")

# Last-frame gauges: (row key, metric name, help).
_LAST_FRAME = (
    ("fwhm", "subwatch_last_frame_fwhm_pixels", "FWHM of the stars of the last sub, pixels."),
    ("stars", "subwatch_last_frame_stars", "Stars detected in the last sub."),
    (
        "background",
        "subwatch_last_frame_background_adu",
        "Sky background level of the last sub, ADU.",
    ),
    ("noise", "subwatch_last_frame_noise_adu", "Sky noise of the last sub, ADU."),
    ("snr", "subwatch_last_frame_snr", "SNR of the brightest stars of the last sub."),
    (
        "eccentricity",
        "subwatch_last_frame_eccentricity",
        "Median star eccentricity of the last sub, 0 = round.",
    ),
    (
        "gradient",
        "subwatch_last_frame_gradient_percent",
        "Sky gradient across the last sub, percent of its sky level.",
    ),
    (
        "gradient_angle",
        "subwatch_last_frame_gradient_angle_degrees",
        "Direction in which the last sub's sky brightens, degrees from +x towards +y.",
    ),
)


def bounded_reason(reason: Any) -> str:
    """The ``reason`` label for a journal row's reason: ``""`` for none, else a known code.

    Exact codes are kept; a code followed by details is cut back to the code; anything else
    becomes ``other``.
    """
    if reason is None:
        return ""
    text = str(reason).strip()
    if not text:
        return ""
    if text in FRAME_REASONS:
        return text
    for prefix, label in _PREFIXES.items():
        if text.startswith(prefix):
            return label
    for known in FRAME_REASONS:
        if text.startswith(known):
            return known
    return OTHER


def _finite(value: Any) -> float | None:
    """A float for a gauge, or None for a missing, non-numeric or non-finite value."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _timestamp(text: Any) -> float | None:
    """POSIX seconds of an ISO time such as a row's ``processed`` (``...Z``), or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def _label(value: Any, default: str) -> str:
    return str(value) if value not in (None, "") else default


class Metrics:
    """The daemon's Prometheus series on an own registry; ``render`` gives the exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._last_seen = 0.0
        reg = self.registry
        self.build = Info("subwatch_build", "Version of the running subwatch.", registry=reg)
        self.build.info({"version": __version__})
        self.start_time = Gauge(
            "subwatch_start_time_seconds",
            "When this daemon started, POSIX seconds.",
            registry=reg,
        )
        self.start_time.set(time.time())
        self.frames = Counter(
            "subwatch_frames",
            "Files handled, by frame kind, outcome and reason (empty when none).",
            ["kind", "status", "reason"],
            registry=reg,
        )
        self.frame_seconds = Histogram(
            "subwatch_frame_seconds",
            "Seconds each stage of the per-frame path took; stage=total is the whole frame.",
            ["stage"],
            buckets=FRAME_BUCKETS,
            registry=reg,
        )
        self.last_frame_timestamp = Gauge(
            "subwatch_last_frame_timestamp_seconds",
            "When the last file was handled, POSIX seconds; 0 until the first.",
            registry=reg,
        )

        def per_stack(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["target", "filter"], registry=reg)

        self.last_frame = {key: per_stack(name, doc) for key, name, doc in _LAST_FRAME}
        self.stack_frames = per_stack(
            "subwatch_stack_frames",
            "Subs integrated into the stack.",
        )
        self.stack_rejected = per_stack(
            "subwatch_stack_rejected_frames",
            "Subs of the stack's target and filter rejected so far.",
        )
        self.stack_integration = per_stack(
            "subwatch_stack_integration_seconds",
            "Total exposure integrated into the stack, seconds.",
        )
        self.stack_snr = per_stack(
            "subwatch_stack_snr",
            "SNR of the stack: its own measurement when status.json has one, else the median"
            " sub SNR times sqrt(frames), the background-limited growth.",
        )
        self.stack_noise = per_stack(
            "subwatch_stack_noise_adu",
            "Sky noise measured on the stack at its last preview, ADU per pixel.",
        )
        self.stack_noise_expected = per_stack(
            "subwatch_stack_noise_expected_adu",
            "Sky noise the stack's subs promise (their noises combined by their weights: the"
            " 1/sqrt(N) expectation), ADU per pixel; above it, the stack integrates badly.",
        )
        self.stack_forecast = per_stack(
            "subwatch_stack_forecast_seconds",
            "Integration still needed to reach previews.target_snr, seconds: 0 once reached,"
            " NaN while the growth cannot tell yet.",
        )
        self.stack_fwhm = per_stack(
            "subwatch_stack_fwhm_pixels",
            "Median FWHM of the subs in the stack, pixels.",
        )
        self.stack_updated = per_stack(
            "subwatch_stack_updated_timestamp_seconds",
            "When the stack was last written, POSIX seconds.",
        )
        self.queue_depth = Gauge(
            "subwatch_queue_depth",
            "Complete files waiting to be processed.",
            registry=reg,
        )
        self.preview_seconds = Histogram(
            "subwatch_preview_seconds",
            "Seconds to render one preview product of a stack.",
            ["product"],
            buckets=PREVIEW_BUCKETS,
            registry=reg,
        )
        # Series that exist from the start, so rate() sees the first stacked or rejected sub
        # as an increase from zero instead of a series appearing out of nowhere.
        self.frames.labels("light", "stacked", "")
        for reason in GATE_REASONS:
            self.frames.labels("light", "rejected", reason)

    # -- feeding -----------------------------------------------------------------------------

    def observe_row(self, row: Mapping[str, Any]) -> None:
        """Count one ``frames.jsonl`` row and update the last-frame gauges and stage timings.

        Tolerant of missing or null keys: a row of a file that never got read has no target
        and no measurement, and only its counter and timestamp move.
        """
        kind = _label(row.get("kind"), "unknown")
        if kind not in FRAME_KINDS:
            kind = "unknown"
        status = _label(row.get("status"), "error")
        if status not in FRAME_STATUSES:
            status = OTHER
        self.frames.labels(kind, status, bounded_reason(row.get("reason"))).inc()

        seconds = row.get("seconds")
        if isinstance(seconds, Mapping):
            for stage, value in seconds.items():
                spent = _finite(value)
                if spent is None or spent < 0:
                    continue
                self.frame_seconds.labels(stage if stage in STAGES else OTHER).observe(spent)

        when = _timestamp(row.get("processed")) or time.time()
        with self._lock:  # rows replayed after a restart must not move the clock back
            if when > self._last_seen:
                self._last_seen = when
                self.last_frame_timestamp.set(when)

        target, filt = row.get("target"), row.get("filter")
        measured = any(row.get(key) is not None for key, _, _ in _LAST_FRAME)
        if kind == "light" and target and filt and measured:
            for key, gauge in self.last_frame.items():
                value = _finite(row.get(key))
                gauge.labels(str(target), str(filt)).set(math.nan if value is None else value)

    def observe_stack(self, status: Mapping[str, Any]) -> None:
        """Update the stack series from one stack's ``status.json`` document."""
        target, filt = status.get("target"), status.get("filter")
        if not target or not filt:
            return
        labels = (str(target), str(filt))
        frames = _finite(status.get("frames_stacked"))
        if frames is not None:
            self.stack_frames.labels(*labels).set(frames)
        rejected = _finite(status.get("frames_rejected"))
        if rejected is not None:
            self.stack_rejected.labels(*labels).set(rejected)
        integration = _finite(status.get("integration_seconds"))
        if integration is not None:
            self.stack_integration.labels(*labels).set(integration)
        fwhm = _finite(status.get("fwhm_median"))
        if fwhm is not None:
            self.stack_fwhm.labels(*labels).set(fwhm)
        snr = _finite(status.get("snr"))
        if snr is None:
            snr = _finite(status.get("stack_snr"))
        if snr is None:
            sub = _finite(status.get("sub_snr_median"))
            if sub is not None and frames is not None and frames > 0:
                snr = sub * math.sqrt(frames)
        if snr is not None:
            self.stack_snr.labels(*labels).set(snr)
        updated = _timestamp(status.get("updated"))
        if updated is not None:
            self.stack_updated.labels(*labels).set(updated)
        report = status.get("snr_report")
        if isinstance(report, Mapping):  # after the stack's first preview
            self._observe_snr_report(labels, report)

    def _observe_snr_report(self, labels: tuple[str, str], report: Mapping[str, Any]) -> None:
        for key, gauge in (
            ("noise", self.stack_noise),
            ("noise_expected", self.stack_noise_expected),
        ):
            value = _finite(report.get(key))
            gauge.labels(*labels).set(math.nan if value is None else value)
        reached = report.get("forecast_method") == "reached"
        remaining = 0.0 if reached else _finite(report.get("forecast_seconds"))
        self.stack_forecast.labels(*labels).set(math.nan if remaining is None else remaining)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(max(0, int(n)))

    def observe_preview(self, seconds: float, product: str = "preview") -> None:
        """Time one preview product; product names are code-defined short identifiers."""
        spent = _finite(seconds)
        if spent is None or spent < 0:
            return
        name = product if _PRODUCT.fullmatch(product or "") else OTHER
        self.preview_seconds.labels(name).observe(spent)

    # -- exposition --------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every series, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
