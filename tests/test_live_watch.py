"""End to end: the daemon watches a folder while the simulator writes a night into it in place,
in chunks; nothing is read early, every light is stacked, and the metrics are served."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from subwatch.config import Config
from subwatch.service import pipeline as pipeline_module
from subwatch.simulate import SimOptions, simulate_session
from watching import Running, rows, wait_until

LIGHTS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_a_night_written_in_place_is_stacked_live(tmp_path: Path, monkeypatch) -> None:
    capture, out = tmp_path / "capture", tmp_path / "out"
    capture.mkdir()
    reads: list[tuple[Path, int]] = []
    real = pipeline_module.read_frame

    def read_frame(path: Path, **kw: Any) -> Any:
        reads.append((Path(path), Path(path).stat().st_size))
        return real(path, **kw)

    monkeypatch.setattr(pipeline_module, "read_frame", read_frame)
    port = _free_port()
    cfg = Config.model_validate(
        {
            # No settle time at all: only the header's promised size can hold a read back.
            "watch": {"path": str(capture), "settle_seconds": 0.0, "poll_seconds": 0.1},
            "output": {"path": str(out)},
            "http": {"listen": f"127.0.0.1:{port}"},
        }
    )
    with Running(cfg, serve_http=True) as running:
        assert running.daemon.feeder.watcher.mode == "inotify"
        truth = simulate_session(
            SimOptions(out=capture, lights=LIGHTS, width=256, height=256, seed=9, interval=0.5)
        )
        names = [light["file"] for light in truth["lights"]]

        def lights_done() -> bool:
            final = {r["file"]: r["status"] for r in running.rows()}
            return all(final.get(n) in ("stacked", "rejected") for n in names)

        wait_until(lights_done, "every light", timeout=120)
        done = len([r for r in running.rows() if r["status"] != "waiting"])
        wait_until(lambda: running.daemon.status().get("frames_done") == done, "the status")
        base = f"http://127.0.0.1:{port}"
        exposition = _get(f"{base}/metrics")
        status = json.loads(_get(f"{base}/api/status"))

    # Nothing was read before it was complete: every read saw the file's final size.
    assert reads and all(size == path.stat().st_size for path, size in reads)
    done_rows = [r for r in rows(out) if r["status"] != "waiting"]
    outcome = {r["file"]: r for r in done_rows}
    # One row per file beyond "waiting": a file seen half-written and complete in one pass of
    # the scanner was once both reported waiting and handed out, then taken a second time.
    taken = Counter(r["file"] for r in done_rows)
    assert set(taken.values()) == {1}, taken.most_common(3)
    assert [outcome[n]["status"] for n in names] == ["stacked"] * LIGHTS

    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    stacked = sum(
        s.value
        for s in families["subwatch_frames"].samples
        if s.name == "subwatch_frames_total" and s.labels["status"] == "stacked"
    )
    assert stacked == LIGHTS
    (frames,) = families["subwatch_stack_frames"].samples
    assert frames.labels == {"target": "M42", "filter": "L"} and frames.value == LIGHTS
    assert "subwatch_queue_depth" in families
    assert families["subwatch_frame_seconds"].type == "histogram"
    assert status["frames_done"] == len(outcome) and status["state"] == "watching"
    assert [s["frames_stacked"] for s in status["stacks"]] == [LIGHTS]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page is fetched from this machine, never through a proxy from the environment."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_the_demo_serves_the_live_page_and_says_where(tmp_path: Path, capsys) -> None:
    from subwatch.service.demo import run_demo

    assert run_demo(tmp_path / "demo", frames=3, interval=0.3, width=256, height=256) == 0
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if "live page:" in x]
    assert line.split()[2].startswith("http://127.0.0.1:")
    assert "stack M42/L:" in printed and "subwatch demo: done." in printed
