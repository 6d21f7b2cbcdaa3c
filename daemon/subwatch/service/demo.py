"""``subwatch demo``: a simulated night, captured and stacked live, in about a minute.

The simulator writes a session into ``OUT/capture`` the way capture software does (calibration
frames first, then lights one by one, each written in place in chunks), while the daemon watches
that folder and stacks into ``OUT/output``, serving the live page (its URL is printed; the
usual ``127.0.0.1:8750``, or a free port when that one is taken). A few subs carry the night's
usual accidents (a satellite trail, cosmic rays, a cloud, a focus slip) so the journal shows
rejections with reasons. The demo ends on its own once the last light is stacked.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

from subwatch.config import Config, HttpConfig, split_listen

log = logging.getLogger(__name__)


def _listen(preferred: str) -> str:
    """``preferred`` if nothing listens there yet, else a free port on the same host."""
    host, port = split_listen(preferred)
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return preferred
        except OSError:
            probe.bind((host, 0))
            return f"{host}:{probe.getsockname()[1]}"


def demo_defects(frames: int) -> dict[int, list[str]]:
    """Accidents spread over the night, never on the first (reference) light."""
    plan = {
        3: ["trail"],
        5: ["cosmic_rays"],
        8: ["clouds"],
        11: ["defocus"],
        13: ["trail", "cosmic_rays"],
    }
    return {i: kinds for i, kinds in plan.items() if i < frames}


def run_demo(
    out: Path,
    *,
    frames: int = 16,
    interval: float = 2.0,
    width: int = 1024,
    height: int = 768,
    seed: int = 7,
    stop: threading.Event | None = None,
) -> int:
    from subwatch.service.daemon import Daemon
    from subwatch.service.pipeline import Pipeline
    from subwatch.simulate import SimOptions, simulate_session

    out = Path(out).resolve()
    capture, output = out / "capture", out / "output"
    for folder in (capture, output):
        if folder.exists():
            shutil.rmtree(folder)
    capture.mkdir(parents=True)
    stop = stop or threading.Event()
    sim_done = threading.Event()
    failure: list[BaseException] = []

    def simulate() -> None:
        try:
            simulate_session(
                SimOptions(
                    out=capture,
                    lights=frames,
                    width=width,
                    height=height,
                    seed=seed,
                    interval=interval,
                    defects=demo_defects(frames),
                    meridian_flip_at=None,
                )
            )
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            sim_done.set()

    cfg = Config.model_validate(
        {
            "watch": {"path": str(capture), "settle_seconds": 0.5, "poll_seconds": 0.25},
            "output": {"path": str(output)},
            "http": {"listen": _listen(HttpConfig().listen)},
        }
    )
    print(f"subwatch demo: simulating {frames} lights of {width}x{height} every {interval:g} s")
    print(f"  capture folder: {capture}")
    print(f"  output folder:  {output}  (frames.jsonl, <target>/<filter>/stack.fits)")

    def show(record: dict[str, Any]) -> None:
        if record.get("kind") != "light":
            return
        extra = f" ({record['reason']})" if record.get("reason") else ""
        fwhm = record.get("fwhm")
        print(
            f"  {record['file']}: {record['status']}{extra}"
            f"  stars={record.get('stars')} fwhm={fwhm if fwhm is not None else '-'}"
            f" snr={record.get('snr')} {record['seconds'].get('total', 0):.2f}s",
            flush=True,
        )

    daemon = Daemon(cfg, stop=stop, idle_exit=sim_done, serve_http=True)

    def started(pipeline: Pipeline) -> None:
        if daemon.web is not None:
            print(f"  live page:      {daemon.web.url}  (metrics: {daemon.web.base_url}metrics)")
        pipeline.listeners.append(show)
        thread.start()  # capture starts once the daemon watches

    thread = threading.Thread(target=simulate, name="simulator", daemon=True)
    daemon.pipeline_hook = started
    summary = daemon.run()
    thread.join(timeout=5)
    if failure:
        print(f"subwatch demo: the simulator failed: {failure[0]}")
        return 1
    print("subwatch demo: done.")
    for key, n in summary.stacks.items():
        print(f"  stack {key}: {n} subs -> {output / key / 'stack.fits'}")
    print(f"  journal: {output / 'frames.jsonl'}")
    return 0
