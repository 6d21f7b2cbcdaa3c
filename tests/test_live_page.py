"""The live page in a real browser: headless Chromium at a phone's size, driven over the DevTools
protocol (with aiohttp's WebSocket client), against a WebServer serving a small night.

The page keeps an event stream open, which a plain ``--screenshot --virtual-time-budget`` run
would wait on for ever (virtual time does not pass while a request is open), so the test talks
to the browser instead: load, wait until the charts are drawn, look at the pixels and the DOM,
then append rows to the journal and watch them arrive through the stream. Skipped when no
Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType
from pydantic import ValidationError

from subwatch.config import HttpConfig
from subwatch.service.metrics import Metrics
from subwatch.service.web import WebServer

WIDTH, HEIGHT = 412, 915  # a phone
LINE_BGR = (60, 85, 210)  # --line in style.css (#d2553c), the accepted subs' stroke
REJECTED_BGR = (60, 162, 230)  # --rejected (#e6a23c)
REJECTED = {4: "clouds", 9: "trailed", 13: "defocused", 17: "clouds"}
N_ROWS = 20


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.skip("Chromium is not installed (apt-get install chromium)")


def star_field(seed: int = 3) -> np.ndarray:
    """A stretched-preview-like 8-bit star field: grey sky, noise, Gaussian stars."""
    rng = np.random.default_rng(seed)
    h, w = 320, 480
    img = rng.normal(38.0, 3.0, (h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    for x, y, peak, sigma in zip(
        rng.uniform(0, w, 150),
        rng.uniform(0, h, 150),
        rng.uniform(60, 217, 150),
        rng.uniform(0.8, 2.2, 150),
        strict=True,
    ):
        r = int(4 * sigma) + 1
        y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
        x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
        sub = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2
        img[y0:y1, x0:x1] += peak * np.exp(-sub / (2 * sigma**2))
    # A faint galaxy, so the picture has structure beyond points.
    img += 40.0 * np.exp(-(((xx - 300) / 60.0) ** 2 + ((yy - 150) / 25.0) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def night_row(i: int) -> dict[str, Any]:
    rejected = i in REJECTED
    return {
        "file": f"2026-01-01/M31_L_{i:04d}.fits",
        "kind": "light",
        "status": "rejected" if rejected else "stacked",
        "reason": REJECTED.get(i),
        "target": "M31",
        "filter": "L",
        "exptime": 120.0,
        "stars": 400 + 5 * i - (250 if rejected else 0),
        "fwhm": round(2.4 + 0.1 * np.sin(i) + (1.4 if rejected else 0.0), 3),
        "eccentricity": 0.3,
        "background": 1000.0 + 4 * i + (300 if rejected else 0),
        "noise": 10.0,
        "snr": 40.0 + (i % 3) - (20 if rejected else 0),
        "gradient": round(1.5 + 0.05 * i + (2.0 if rejected else 0.0), 3),
        "gradient_angle": (350.0 + 3 * i) % 360,  # wraps through 0 during the night
        "seconds": {"load": 0.01, "total": 0.3},
        "processed": f"2026-01-01T22:{i:02d}:00Z",
    }


@pytest.fixture
def night(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    stack = out / "M31" / "L"
    stack.mkdir(parents=True)
    field = star_field()
    assert cv2.imwrite(str(stack / "preview.png"), field)
    assert cv2.imwrite(str(stack / "denoised.png"), cv2.GaussianBlur(field, (0, 0), 1.0))
    rows = [night_row(i) for i in range(N_ROWS)]
    rows.insert(7, {"file": "bias/b1.fits", "kind": "bias", "status": "calibration"})
    (out / "frames.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = {
        "target": "M31",
        "filter": "L",
        "frames_stacked": N_ROWS - len(REJECTED),
        "frames_rejected": len(REJECTED),
        "integration_seconds": 120.0 * (N_ROWS - len(REJECTED)),
        "fwhm_median": 2.41,
        "sub_snr_median": 41.0,
        "updated": "2026-01-01T22:20:00Z",
    }
    (stack / "status.json").write_text(json.dumps(status))
    return out


@pytest.fixture
def server(night: Path) -> Iterator[WebServer]:
    try:
        http = HttpConfig(listen="127.0.0.1:0")
    except ValidationError:  # the config file asks for 1..65535; 0 is any free port
        http = HttpConfig.model_construct(listen="127.0.0.1:0", token=None, enabled=True)
    srv = WebServer(http, night, Metrics(), lambda: {"queue_depth": 0, "state": "watching"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[int]:
    """A headless Chromium; yields its DevTools port."""
    exe = chromium()
    profile = tmp_path / "profile"
    log = open(tmp_path / "chromium.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--disable-extensions",
            "--no-first-run",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its helpers form one process group, ended together below
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                text = (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"Chromium did not start: {text}")
            time.sleep(0.05)
        yield int(active.read_text().split()[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the browser and every helper it started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


class DevTools:
    """The few DevTools protocol calls the test needs, on one page."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self.ws = ws
        self.last_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            if msg.type != WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed: {msg.type}")
            doc = json.loads(msg.data)
            if doc.get("id") == self.last_id:
                if "error" in doc:
                    raise RuntimeError(f"{method}: {doc['error']}")
                return doc.get("result", {})

    async def js(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 15.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                html = await self.js("document.body.outerHTML")
                raise AssertionError(f"timed out waiting for {what}; page: {html[:3000]}")
            await asyncio.sleep(0.1)

    async def screenshot(self) -> np.ndarray:
        height = await self.js("document.documentElement.scrollHeight")
        shot = await self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": WIDTH, "height": max(HEIGHT, height), "scale": 1},
        )
        image = cv2.imdecode(np.frombuffer(base64.b64decode(shot["data"]), np.uint8), 1)
        assert image is not None
        return image

    async def tap(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )


class Charts(HTMLParser):
    """From serialised HTML: per chart, its circles (class, title) and polyline vertices."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, Any]] = {}
        self._chart: str | None = None
        self._circle: dict[str, Any] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg" and "chart" in a.get("class", "").split():
            self._chart = a["data-metric"]
            self.charts.setdefault(self._chart, {"circles": [], "line": 0})
        elif self._chart and tag == "circle":
            self._circle = {"class": a.get("class", "").split(), "title": ""}
            self.charts[self._chart]["circles"].append(self._circle)
        elif self._chart and tag == "polyline":
            self.charts[self._chart]["line"] = len(a.get("points", "").split())
        elif tag == "title" and self._circle is not None:
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        elif tag == "circle":
            self._circle = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title and self._circle is not None:
            self._circle["title"] += data


def near(image: np.ndarray, bgr: tuple[int, int, int], tol: int = 28) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - np.array(bgr)) <= tol, axis=2)


async def session(server: WebServer, port: int, night: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            dt = DevTools(ws)
            await dt.send(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=True,
            )
            await dt.send("Page.navigate", url=server.url)
            await dt.wait_for(
                "document.querySelectorAll('svg.chart[data-metric=snr] circle').length === 20"
                " && (() => { const i = document.querySelector('.card .image img');"
                " return i && !i.hidden && i.complete && i.naturalWidth > 0; })()",
                "charts and preview",
            )
            await dt.wait_for("document.getElementById('conn').dataset.state === 'live'", "SSE")
            await asyncio.sleep(0.2)  # let the last render settle before the pictures
            results["html"] = await dt.js("document.documentElement.outerHTML")
            results["img_rect"] = await dt.js(
                "(() => { const i = document.querySelector('.card .image img');"
                " const r = i.getBoundingClientRect();"
                " return [r.left + scrollX, r.top + scrollY, r.width, r.height,"
                " i.naturalWidth, i.naturalHeight]; })()"
            )
            results["charts_rect"] = await dt.js(
                "(() => { const r = document.querySelector('.card .charts')"
                ".getBoundingClientRect();"
                " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()"
            )
            results["fits"] = await dt.js(
                "document.documentElement.scrollWidth <= window.innerWidth"
            )
            results["facts"] = await dt.js(
                "Array.from(document.querySelectorAll('.card .facts dd'), d => d.textContent)"
            )
            results["screenshot"] = await dt.screenshot()

            # A tap on a rejected point shows its reason (phones have no hover). On a loaded
            # machine the layout can still move (a preview image arriving) between measuring
            # the point and tapping it, and a tap beside it hides the tip: measure, tap again.
            for attempt in range(3):
                x, y = await dt.js(
                    "(() => { const c = document.querySelector("
                    "'svg.chart[data-metric=fwhm] circle.rejected');"
                    " const r = c.getBoundingClientRect();"
                    " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
                )
                await dt.tap(x, y)
                try:
                    results["tip"] = await dt.wait_for(
                        "(() => { const t = document.getElementById('tip');"
                        " return !t.hidden && t.textContent; })()",
                        "the tooltip",
                        timeout=5.0,
                    )
                    break
                except AssertionError:
                    if attempt == 2:
                        raise

            # Switch the product.
            await dt.js("document.querySelector('button[data-product=denoised]').click()")
            results["src"] = await dt.wait_for(
                "(() => { const s = document.querySelector('.card .image img')"
                ".getAttribute('src'); return s.includes('denoised') && s; })()",
                "the denoised preview",
            )

            # New subs arrive through the event stream, without a reload.
            late = [night_row(N_ROWS), {**night_row(N_ROWS + 1), "status": "rejected"}]
            late[1]["reason"] = "trailed"
            with open(night / "frames.jsonl", "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in late))
            await dt.wait_for(
                "document.querySelectorAll('svg.chart[data-metric=fwhm] circle').length === 22",
                "rows pushed by the event stream",
            )
            results["html_after"] = await dt.js("document.documentElement.outerHTML")
            await dt.send("Browser.close")
    return results


def test_live_page_on_a_phone(server: WebServer, browser: int, night: Path) -> None:
    got = asyncio.run(session(server, browser, night))
    shot = got["screenshot"]

    # The DOM: six charts, one point per light sub (the bias row is not a point), the
    # rejected ones marked and titled with their reason; the line joins the accepted subs,
    # except for the gradient's direction (an angle wraps: points alone).
    charts = Charts()
    charts.feed(got["html"])
    assert set(charts.charts) == {
        "fwhm",
        "stars",
        "background",
        "snr",
        "gradient",
        "gradient_angle",
    }
    for metric, chart in charts.charts.items():
        circles = chart["circles"]
        assert len(circles) == N_ROWS, metric
        rejected = [c for c in circles if "rejected" in c["class"]]
        assert len(rejected) == len(REJECTED), metric
        joined = 0 if metric == "gradient_angle" else N_ROWS - len(REJECTED)
        assert chart["line"] == joined, metric
        for c, (index, reason) in zip(rejected, sorted(REJECTED.items()), strict=True):
            assert f"#{index + 1} " in c["title"] and f"rejected: {reason}" in c["title"]
        assert all("stacked" in c["title"] for c in circles if "ok" in c["class"])
    assert "16" in got["facts"] and "4" in got["facts"] and "32 min" in got["facts"]
    assert got["fits"], "the page scrolls sideways on a phone"
    assert "rejected: clouds" in got["tip"]
    assert "denoised.png?v=" in got["src"]

    after = Charts()
    after.feed(got["html_after"])
    fwhm = after.charts["fwhm"]["circles"]
    assert len(fwhm) == N_ROWS + 2
    assert "rejected: trailed" in fwhm[-1]["title"] and "ok" in fwhm[-2]["class"]

    # The pixels: the preview shows the star field ...
    x, y, w, h, nw, nh = got["img_rect"]
    scale = min(w / nw, h / nh)  # object-fit: contain
    dw, dh = nw * scale, nh * scale
    x0, y0 = round(x + (w - dw) / 2), round(y + (h - dh) / 2)
    region = cv2.cvtColor(shot[y0 : y0 + round(dh), x0 : x0 + round(dw)], cv2.COLOR_BGR2GRAY)
    assert region.shape[0] > 100 and region.shape[1] > 300, region.shape
    source = cv2.resize(star_field(), (region.shape[1], region.shape[0]), cv2.INTER_AREA)
    a = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 2.0).ravel()
    b = cv2.GaussianBlur(source.astype(np.float32), (0, 0), 2.0).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8
    assert abs(float(np.median(region)) - 38) < 10  # the sky level, not the page background
    assert (region > 150).sum() > 50  # bright star cores

    # ... and the charts are drawn: the line colour and the rejected markers' amber.
    cx, cy, cw, ch = (round(v) for v in got["charts_rect"])
    charts_px = shot[cy : cy + ch, cx : cx + cw]
    assert near(charts_px, LINE_BGR).sum() > 200
    assert near(charts_px, REJECTED_BGR).sum() > 40
    outside = shot.copy()
    outside[cy : cy + ch, cx : cx + cw] = 0
    assert near(outside, LINE_BGR).sum() < 20  # that colour is the charts' alone
