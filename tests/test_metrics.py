"""Metrics: names, labels and values as Prometheus scrapes them, and the Grafana dashboard's
expressions only naming series the daemon exports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from subwatch import __version__
from subwatch.service.metrics import FRAME_REASONS, Metrics, bounded_reason

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "config" / "grafana" / "subwatch.json"


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "file": "night1/M31_L_0001.fits",
        "kind": "light",
        "status": "stacked",
        "reason": None,
        "target": "M31",
        "filter": "L",
        "exptime": 120.0,
        "stars": 412,
        "fwhm": 2.61,
        "eccentricity": 0.31,
        "background": 1020.5,
        "noise": 11.2,
        "snr": 48.5,
        "gradient": 3.2,
        "gradient_angle": 271.5,
        "seconds": {"load": 0.012, "calibrate": 0.03, "measure": 0.09, "total": 0.4},
        "processed": "2026-01-01T22:00:00Z",
    }
    base.update(kw)
    return base


def samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from the text exposition."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for lab, v in found.get(name, []) if lab == labels]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


@pytest.fixture
def night() -> Metrics:
    m = Metrics()
    for i in range(3):
        m.observe_row(row(file=f"L_{i}.fits", stars=400 + i, processed=f"2026-01-01T22:0{i}:00Z"))
    m.observe_row(row(file="L_3.fits", status="rejected", reason="clouds", stars=90, fwhm=2.9))
    m.observe_row(row(file="L_4.fits", status="rejected", reason="clouds", snr=None))
    m.observe_row(row(file="L_5.fits", status="rejected", reason="registration failed"))
    # Errors with free text: bounded to their code or to "other".
    m.observe_row(
        {
            "file": "x/broken.fits",
            "kind": "unknown",
            "status": "error",
            "reason": "truncated (12000 of 50000 bytes)",
            "seconds": {"total": 0.0},
        }
    )
    m.observe_row(
        {"file": "weird.fits", "status": "error", "reason": "OSError: [Errno 5] /dev/sdb1 gone"}
    )
    m.observe_row({"file": "odd.fits", "kind": "light", "status": "error", "reason": None})
    m.observe_row({"file": "slow.fits", "status": "waiting", "reason": "settling"})
    m.observe_row(row(file="bias_1.fits", kind="bias", status="calibration", target=None))
    m.observe_stack(
        {
            "target": "M31",
            "filter": "L",
            "frames_stacked": 3,
            "frames_rejected": 3,
            "integration_seconds": 360.0,
            "fwhm_median": 2.61,
            "sub_snr_median": 48.5,
            "updated": "2026-01-01T22:05:00Z",
        }
    )
    # A stack after its first preview: the SNR report's noise and forecast.
    m.observe_stack(
        {
            "target": "M31",
            "filter": "Ha",
            "frames_stacked": 5,
            "snr_report": {"noise": 3.0, "noise_expected": 2.9, "forecast_seconds": 600.0},
        }
    )
    m.set_queue_depth(4)
    m.observe_preview(0.8)
    m.observe_preview(12.0, "denoised")
    return m


def test_frame_counters_by_kind_status_and_bounded_reason(night: Metrics) -> None:
    found = samples(night)
    total = "subwatch_frames_total"
    assert value(found, total, kind="light", status="stacked", reason="") == 3
    assert value(found, total, kind="light", status="rejected", reason="clouds") == 2
    assert value(found, total, kind="light", status="rejected", reason="registration failed") == 1
    # Gate reasons exist from the start, at zero, so rate() sees their first increase.
    assert value(found, total, kind="light", status="rejected", reason="trailed") == 0
    assert value(found, total, kind="unknown", status="error", reason="truncated") == 1
    assert value(found, total, kind="unknown", status="error", reason="other") == 1
    assert value(found, total, kind="light", status="error", reason="") == 1
    assert value(found, total, kind="unknown", status="waiting", reason="other") == 1
    assert value(found, total, kind="bias", status="calibration", reason="") == 1
    reasons = {lab["reason"] for lab, _ in found[total]}
    assert reasons <= {"", "other", *FRAME_REASONS}
    assert sum(v for _, v in found[total]) == 11


def test_no_file_label_and_no_file_names_anywhere(night: Metrics) -> None:
    body = night.render()[0].decode()
    found = samples(night)
    for name, entries in found.items():
        for labels, _ in entries:
            assert "file" not in labels, name
    for fragment in ("L_3.fits", "broken", "weird", "sdb1", "night1"):
        assert fragment not in body


def test_last_frame_gauges_follow_the_last_measured_light(night: Metrics) -> None:
    found = samples(night)
    lab = {"target": "M31", "filter": "L"}
    # The last light with a target was L_5 (registration failed), measured like row().
    assert value(found, "subwatch_last_frame_fwhm_pixels", **lab) == pytest.approx(2.61)
    assert value(found, "subwatch_last_frame_stars", **lab) == 412
    assert value(found, "subwatch_last_frame_background_adu", **lab) == pytest.approx(1020.5)
    assert value(found, "subwatch_last_frame_noise_adu", **lab) == pytest.approx(11.2)
    assert value(found, "subwatch_last_frame_snr", **lab) == pytest.approx(48.5)
    assert value(found, "subwatch_last_frame_eccentricity", **lab) == pytest.approx(0.31)
    assert value(found, "subwatch_last_frame_gradient_percent", **lab) == pytest.approx(3.2)
    assert value(found, "subwatch_last_frame_gradient_angle_degrees", **lab) == 271.5
    # Calibration and error rows leave them alone; only M31/L series exist.
    assert {tuple(sorted(labels.items())) for labels, _ in found["subwatch_last_frame_stars"]} == {
        (("filter", "L"), ("target", "M31"))
    }
    # The latest "processed" time wins; replayed older rows do not move it back.
    stamp = value(found, "subwatch_last_frame_timestamp_seconds")
    assert stamp >= 1767304920.0  # 2026-01-01T22:02:00Z, the latest row time given
    night.observe_row(row(processed="2020-01-01T00:00:00Z"))
    assert value(samples(night), "subwatch_last_frame_timestamp_seconds") == stamp


def test_missing_value_in_a_measured_row_is_nan_not_stale() -> None:
    m = Metrics()
    m.observe_row(row(snr=30.0))
    m.observe_row(row(snr=None))
    snr = value(samples(m), "subwatch_last_frame_snr", target="M31", filter="L")
    assert math.isnan(snr)


def test_stack_series(night: Metrics) -> None:
    found = samples(night)
    lab = {"target": "M31", "filter": "L"}
    assert value(found, "subwatch_stack_frames", **lab) == 3
    assert value(found, "subwatch_stack_rejected_frames", **lab) == 3
    assert value(found, "subwatch_stack_integration_seconds", **lab) == 360
    assert value(found, "subwatch_stack_fwhm_pixels", **lab) == pytest.approx(2.61)
    # No stack SNR in status.json: the median sub SNR grown by sqrt(N).
    assert value(found, "subwatch_stack_snr", **lab) == pytest.approx(48.5 * math.sqrt(3))
    assert value(found, "subwatch_stack_updated_timestamp_seconds", **lab) == 1767305100
    # A measured stack SNR, when status.json has one, is used as is.
    night.observe_stack({"target": "M31", "filter": "L", "frames_stacked": 4, "snr": 91.0})
    found = samples(night)
    assert value(found, "subwatch_stack_snr", **lab) == 91.0
    assert value(found, "subwatch_stack_frames", **lab) == 4
    # No preview of M31/L yet: no noise or forecast series for it (M31/Ha has them).
    assert not [lab for lab, _ in found["subwatch_stack_noise_adu"] if lab["filter"] == "L"]
    assert value(found, "subwatch_stack_forecast_seconds", target="M31", filter="Ha") == 600


def test_stack_noise_and_forecast_from_the_preview_report() -> None:
    m = Metrics()
    lab = {"target": "M31", "filter": "L"}
    report = {"noise": 2.1, "noise_expected": 2.0, "forecast_seconds": 5400.0}
    m.observe_stack({**lab, "snr_report": {**report, "forecast_method": "fit"}})
    found = samples(m)
    assert value(found, "subwatch_stack_noise_adu", **lab) == pytest.approx(2.1)
    assert value(found, "subwatch_stack_noise_expected_adu", **lab) == pytest.approx(2.0)
    assert value(found, "subwatch_stack_forecast_seconds", **lab) == 5400.0
    # The target reached: 0 seconds to go (status.json has no forecast_seconds then).
    m.observe_stack({**lab, "snr_report": {"noise": 1.9, "forecast_method": "reached"}})
    found = samples(m)
    assert value(found, "subwatch_stack_forecast_seconds", **lab) == 0.0
    assert math.isnan(value(found, "subwatch_stack_noise_expected_adu", **lab))  # not stale
    # Too early to tell: NaN, not the last forecast.
    m.observe_stack({**lab, "snr_report": {"forecast_seconds": None, "forecast_method": None}})
    assert math.isnan(value(samples(m), "subwatch_stack_forecast_seconds", **lab))


def test_queue_preview_build_and_frame_histograms(night: Metrics) -> None:
    found = samples(night)
    assert value(found, "subwatch_queue_depth") == 4
    assert value(found, "subwatch_build_info", version=__version__) == 1
    assert value(found, "subwatch_preview_seconds_count", product="preview") == 1
    assert value(found, "subwatch_preview_seconds_count", product="denoised") == 1
    assert value(found, "subwatch_preview_seconds_sum", product="denoised") == 12.0
    assert value(found, "subwatch_preview_seconds_bucket", product="preview", le="1.0") == 1
    assert value(found, "subwatch_preview_seconds_bucket", product="preview", le="0.5") == 0
    # Stage timings: seven rows with "load" (0.012 s), eight with "total" (0.4 s or 0.0 s).
    assert value(found, "subwatch_frame_seconds_count", stage="load") == 7
    assert value(found, "subwatch_frame_seconds_count", stage="total") == 8
    assert value(found, "subwatch_frame_seconds_bucket", stage="load", le="0.005") == 0
    assert value(found, "subwatch_frame_seconds_bucket", stage="load", le="0.025") == 7
    assert value(found, "subwatch_frame_seconds_bucket", stage="total", le="0.005") == 1
    assert value(found, "subwatch_frame_seconds_bucket", stage="total", le="+Inf") == 8
    buckets = {
        lab["le"] for lab, _ in found["subwatch_frame_seconds_bucket"] if lab["stage"] == "total"
    }
    assert {"0.005", "10.0", "+Inf"} <= buckets


def test_rows_with_nothing_in_them_are_counted_and_do_not_raise() -> None:
    m = Metrics()
    m.observe_row({})
    m.observe_row({"status": None, "kind": None, "seconds": None, "stars": "many"})
    m.observe_row({"status": "stacked", "kind": "light", "target": "M1", "filter": None})
    m.observe_row({"status": "stacked", "seconds": {"load": "fast", "weird stage": 0.1}})
    m.observe_stack({})
    m.observe_stack({"target": "M1", "filter": "Ha", "frames_stacked": None})
    m.observe_preview(float("nan"))
    m.observe_preview(1.0, "Not A Product Name!")
    found = samples(m)
    assert value(found, "subwatch_frames_total", kind="unknown", status="error", reason="") == 2
    assert value(found, "subwatch_frame_seconds_count", stage="other") == 1
    assert value(found, "subwatch_preview_seconds_count", product="other") == 1
    assert "subwatch_last_frame_stars" not in found  # nothing measured: no series
    assert value(found, "subwatch_last_frame_timestamp_seconds") > 0


def test_two_instances_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()
    a.set_queue_depth(7)
    assert value(samples(b), "subwatch_queue_depth") == 0
    assert value(samples(a), "subwatch_queue_depth") == 7


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (None, ""),
        ("", ""),
        ("clouds", "clouds"),
        ("too few stars", "too few stars"),
        ("truncated (1 of 2 MB)", "truncated"),
        ("unknown frame type 'FOCUS'", "unknown frame type"),
        ("waiting for data (12 of 50 MB)", "waiting for data"),
        ("already stacked as night1/L_0001.fits", "already stacked"),
        ("same content as night1/L_0001.fits (stacked)", "same content"),
        ("Traceback (most recent call last): ...", "other"),
        ("x" * 500, "other"),
    ],
)
def test_bounded_reason(reason: str | None, label: str) -> None:
    assert bounded_reason(reason) == label


# -- the Grafana dashboard -------------------------------------------------------------------

_PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "time", "max",
    "min", "avg", "count", "le", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "offset", "bool", "clamp_min", "clamp_max", "delta", "deriv", "topk", "bottomk",
    "timestamp", "vector", "scalar", "abs", "label_values", "absent", "changes", "resets",
    "max_over_time", "min_over_time", "avg_over_time", "last_over_time", "sort", "sort_desc",
    "ceil", "floor", "round", "inf", "nan",
}  # fmt: skip


def _panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in doc.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def _metric_names(expr: str) -> set[str]:
    """Identifiers of an expression that are metric names (not functions, labels or values)."""
    text = re.sub(r'"[^"]*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # matchers
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\$\w+", "", text)  # dashboard variables
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"\d+[smhdw]?", n)}


def test_dashboard_only_uses_exported_metrics(night: Metrics) -> None:
    doc = json.loads(DASHBOARD.read_text())
    exported = set(samples(night))
    assert {"__inputs", "schemaVersion", "templating", "panels", "title", "uid"} <= set(doc)
    assert any(i.get("pluginId") == "prometheus" for i in doc["__inputs"])
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert {"target", "filter"} <= set(variables)
    for name in ("target", "filter"):
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        assert query.startswith("label_values(")
        series, label = query[len("label_values(") : -1].rsplit(",", 1)
        assert label.strip() == name
        assert _metric_names(series) <= exported
        assert _metric_names(series)
    exprs = []
    for panel in _panels(doc):
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    assert len(exprs) >= 10
    used: set[str] = set()
    for title, expr in exprs:
        names = _metric_names(expr)
        assert names, (title, expr)
        assert names <= exported, (title, names - exported)
        used |= names
    for needed in (
        "subwatch_last_frame_fwhm_pixels",
        "subwatch_last_frame_stars",
        "subwatch_last_frame_background_adu",
        "subwatch_last_frame_gradient_percent",
        "subwatch_last_frame_gradient_angle_degrees",
        "subwatch_stack_snr",
        "subwatch_stack_frames",
        "subwatch_frames_total",
        "subwatch_queue_depth",
        "subwatch_frame_seconds_bucket",
        "subwatch_preview_seconds_bucket",
        "subwatch_last_frame_timestamp_seconds",
    ):
        assert needed in used, needed
    titles = [p["title"] for p in _panels(doc)]
    assert len(titles) == len(set(titles))
    ids = [p["id"] for p in _panels(doc)]
    assert len(ids) == len(set(ids))


def test_metric_name_parser_sees_through_promql() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, stage) (rate(subwatch_frame_seconds_bucket"
        '{job="x"}[5m])))'
    )
    assert _metric_names(expr) == {"subwatch_frame_seconds_bucket"}
    assert _metric_names("time() - max(subwatch_last_frame_timestamp_seconds > 0)") == {
        "subwatch_last_frame_timestamp_seconds"
    }
    assert _metric_names("subwatch_nonexistent_total") == {"subwatch_nonexistent_total"}
