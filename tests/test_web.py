"""The HTTP server over real sockets: routes, paging, server-sent events, files, the token,
and the ways people try to read what they should not."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from subwatch.config import HttpConfig
from subwatch.service.metrics import Metrics
from subwatch.service.web import Journal, WebServer, is_loopback, parse_listen

TOKEN = "s3cret-Token-4711"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c63600000000200015e2d8e2f0000000049454e44ae426082"
)


def http_config(listen: str = "127.0.0.1:0", token: str | None = None) -> HttpConfig:
    try:
        return HttpConfig(listen=listen, token=token)
    except ValidationError:
        # The config file asks for ports 1..65535; port 0 (any free port) is what tests need.
        return HttpConfig.model_construct(listen=listen, token=token, enabled=True)


def frame_row(i: int, **kw: Any) -> dict[str, Any]:
    row = {
        "file": f"L_{i:03d}.fits",
        "kind": "light",
        "status": "stacked",
        "reason": None,
        "target": "M31",
        "filter": "L",
        "fwhm": 2.5,
        "stars": 300 + i,
        "seconds": {"total": 0.2},
    }
    row.update(kw)
    return row


def write_rows(path: Path, rows: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


@pytest.fixture
def output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    stack = out / "M31" / "L"
    stack.mkdir(parents=True)
    write_rows(out / "frames.jsonl", [frame_row(i) for i in range(3)])
    (stack / "status.json").write_text(json.dumps({"target": "M31", "filter": "L", "x": 1}))
    (stack / "preview.png").write_bytes(PNG)
    (stack / "notes.txt").write_text("not served")
    (out / ".checkpoint").mkdir()
    (out / ".checkpoint" / "state.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_text("SECRET-OUTSIDE")
    (outside / "secret.json").write_text('{"SECRET": "OUTSIDE"}')
    (outside / "x").mkdir()
    (outside / "x" / "secret.png").write_text("SECRET-OUTSIDE")
    (outside / "x" / "preview.png").write_text("SECRET-OUTSIDE")
    os.symlink(outside / "secret.png", stack / "leak.png")
    os.symlink(outside, out / "M42")  # a whole stack folder pointing outside
    return out


Status = dict[str, Any]


@pytest.fixture
def status_doc() -> Status:
    return {"frames": 3, "queue_depth": 1, "stacks": [{"target": "M31", "filter": "L"}]}


def start(output: Path, status: Status, token: str | None = None) -> WebServer:
    metrics = Metrics()
    metrics.set_queue_depth(5)
    server = WebServer(http_config(token=token), output, metrics, lambda: status)
    server.start()
    return server


@pytest.fixture
def server(output: Path, status_doc: Status) -> Iterator[WebServer]:
    srv = start(output, status_doc)
    yield srv
    srv.stop()


def request(
    srv: WebServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def get_json(srv: WebServer, path: str, **headers: str) -> Any:
    status, head, body = request(srv, path, headers=headers)
    assert status == 200, (path, status, body)
    assert head["content-type"].startswith("application/json")
    return json.loads(body)


# -- routes ----------------------------------------------------------------------------------


def test_metrics_status_and_page(server: WebServer, status_doc: Status) -> None:
    status, head, body = request(server, "/metrics")
    assert status == 200
    assert head["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["subwatch_queue_depth"].samples[0].value == 5
    assert get_json(server, "/api/status") == status_doc
    status, head, body = request(server, "/")
    assert status == 200 and head["content-type"].startswith("text/html")
    assert b'src="static/app.js"' in body
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, head, _ = request(server, f"/static/{asset}")
        assert status == 200 and head["content-type"].startswith(kind)
    assert request(server, "/static/nothing.js")[0] == 404
    assert server.url == f"http://127.0.0.1:{server.port}/" == server.base_url


def test_status_with_nan_is_valid_json(output: Path) -> None:
    srv = start(output, {"snr": float("nan"), "n": np.float32(2.5), "a": np.arange(2)})
    try:
        assert get_json(srv, "/api/status") == {"snr": None, "n": 2.5, "a": [0, 1]}
    finally:
        srv.stop()


def test_security_headers_everywhere(server: WebServer) -> None:
    for path in ("/", "/api/status", "/metrics", "/nowhere", "/files/M31/L/preview.png"):
        _, head, _ = request(server, path)
        assert head["x-content-type-options"] == "nosniff", path
        assert "default-src 'self'" in head["content-security-policy"], path
        assert head["referrer-policy"] == "no-referrer", path
    for path in ("/api/status", "/api/frames", "/metrics"):
        assert request(server, path)[1]["cache-control"] == "no-store"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_read_only(server: WebServer, method: str) -> None:
    for path in ("/api/status", "/metrics", "/files/M31/L/preview.png", "/anything"):
        status, head, _ = request(server, path, method=method)
        assert status == 405, (method, path)
        assert head["allow"] == "GET, HEAD"
    assert (server.output / "frames.jsonl").read_text().count("\n") == 3


def test_head(server: WebServer) -> None:
    status, head, body = request(server, "/api/status", method="HEAD")
    assert status == 200 and body == b""
    assert head["content-type"].startswith("application/json")
    assert request(server, "/api/events", method="HEAD")[0] == 200


# -- frames ----------------------------------------------------------------------------------


def test_frames_paging_and_torn_last_line(server: WebServer, output: Path) -> None:
    journal = output / "frames.jsonl"
    write_rows(journal, [frame_row(i) for i in range(5)], tail='{"file": "L_005.fi')
    page = get_json(server, "/api/frames?since=0&limit=2")
    assert page["next"] == 2 and page["more"] is True
    assert [r["file"] for r in page["frames"]] == ["L_000.fits", "L_001.fits"]
    page = get_json(server, "/api/frames?since=2&limit=100")
    assert page["next"] == 5 and page["more"] is False
    assert [r["file"] for r in page["frames"]] == ["L_002.fits", "L_003.fits", "L_004.fits"]
    assert get_json(server, "/api/frames?since=5") == {"next": 5, "frames": [], "more": False}
    # The writer finishes the line: it becomes row 5.
    append(journal, 'ts", "status": "rejected", "reason": "clouds"}\n')
    page = get_json(server, "/api/frames?since=5")
    assert page["next"] == 6
    assert page["frames"] == [{"file": "L_005.fits", "status": "rejected", "reason": "clouds"}]
    # A damaged complete line is a row that is skipped, so the numbering stays the writer's.
    append(journal, "\x00\x00garbage\n" + json.dumps(frame_row(7)) + "\n")
    page = get_json(server, "/api/frames?since=6")
    assert page["next"] == 8 and [r["file"] for r in page["frames"]] == ["L_007.fits"]
    # Default: everything from 0; the cap keeps a huge limit sane.
    assert get_json(server, "/api/frames")["next"] == 8
    assert get_json(server, "/api/frames?limit=1000000000")["next"] == 8


def test_frames_reset_and_bad_parameters(server: WebServer, output: Path) -> None:
    assert get_json(server, "/api/frames?since=50") == {
        "reset": True,
        "next": 3,
        "frames": [],
        "more": False,
    }
    for query in ("since=-1", "since=abc", "limit=0", "limit=x"):
        status, _, body = request(server, f"/api/frames?{query}")
        assert status == 400, query
        assert "error" in json.loads(body)
    (output / "frames.jsonl").unlink()
    assert get_json(server, "/api/frames") == {"next": 0, "frames": [], "more": False}


def test_journal_notices_a_cut_back_or_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "frames.jsonl"
    write_rows(path, [frame_row(i) for i in range(4)])
    journal = Journal(path)
    assert journal.refresh() == 4
    with open(path, "rb+") as fh:  # a restart cuts the journal back to its checkpoint ...
        fh.truncate(len(json.dumps(frame_row(0))) + 1)
    append(path, json.dumps(frame_row(9)) + "\n" + json.dumps(frame_row(10)) + "\n")
    assert journal.refresh() == 3  # ... and it grew again past where it was
    assert journal.resets == 1
    assert [r["file"] for _, r in journal.rows(0, 10)[1]] == [
        "L_000.fits",
        "L_009.fits",
        "L_010.fits",
    ]
    os.replace(path, tmp_path / "frames.old.jsonl")
    write_rows(path, [frame_row(20)])
    assert journal.refresh() == 1 and journal.resets == 2


def test_stacks(server: WebServer) -> None:
    doc = get_json(server, "/api/stacks")
    # M42 is a link to a folder outside the output with a preview.png in it: not listed.
    assert [(s["target"], s["filter"]) for s in doc["stacks"]] == [("M31", "L")]
    entry = doc["stacks"][0]
    assert entry["status"] == {"target": "M31", "filter": "L", "x": 1}
    assert set(entry["products"]) == {"preview"}
    url = entry["products"]["preview"]["url"]
    assert url.startswith("files/M31/L/preview.png?v=")
    status, _, body = request(server, "/" + url)
    assert status == 200 and body == PNG


# -- files -----------------------------------------------------------------------------------


def test_files_served(server: WebServer) -> None:
    status, head, body = request(server, "/files/M31/L/preview.png")
    assert (status, head["content-type"], body) == (200, "image/png", PNG)
    status, head, body = request(server, "/files/M31/L/status.json")
    assert status == 200 and head["content-type"] == "application/json"
    assert json.loads(body)["x"] == 1
    assert request(server, "/files/M31/L/denoised.png")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/files/../frames.jsonl",
        "/files/M31/../../frames.jsonl",
        "/files/%2e%2e/frames.jsonl",
        "/files/%2e%2e/%2e%2e/frames.jsonl",
        "/files/M31/%2e%2e/status.json",
        "/files/M31/L/%2e%2e%2f%2e%2e%2fframes.jsonl",
        "/files/%252e%252e/%252e%252e/frames.jsonl",
        "/files/M31/%252e%252e/status.json",
        "/files//etc/passwd",
        "/files/%2fetc/x/passwd",
        "/files/M31/L/%2fetc%2fpasswd",
        "/files/M31/L/..%5c..%5cframes.jsonl",
        "/files/M31/L/leak.png",
        "/files/M42/x/secret.png",
        "/files/M42/x/preview.png",
        "/files/M42/../secret.json",
        "/files/.checkpoint/x/state.json",
        "/files/M31/L/notes.txt",
        "/files/M31/L/.preview.png.tmp",
        "/frames.jsonl",
        "/static/../frames.jsonl",
        "/static/%2e%2e/frames.jsonl",
    ],
)
def test_files_traversal_refused(server: WebServer, path: str) -> None:
    status, _, body = request(server, path)
    assert status in (403, 404), (path, status)
    for leaked in (b"SECRET", b"L_000.fits", b"root:", b"{}"):
        assert leaked not in body, (path, body)


def test_symlink_inside_the_output_is_served(server: WebServer, output: Path) -> None:
    (output / "M31" / "L" / "latest.png").symlink_to(output / "M31" / "L" / "preview.png")
    assert request(server, "/files/M31/L/latest.png")[2] == PNG


# -- the token -------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.168.1.20:8750", "scope.lan:80"])
def test_network_bind_needs_a_token(output: Path, listen: str) -> None:
    with pytest.raises(ValueError, match=r"http\.token"):
        WebServer(http_config(listen), output, Metrics(), dict)
    WebServer(http_config(listen, token=TOKEN), output, Metrics(), dict)  # fine with one


def test_other_host_names_refused_without_a_token(server: WebServer) -> None:
    for host in ("evil.example", "evil.example:80", "192.168.1.5", "127.0.0.1.evil.example"):
        status, _, body = request(server, "/api/status", headers={"Host": host})
        assert status == 403, host
        assert b"queue_depth" not in body
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:8750"):
        assert request(server, "/api/status", headers={"Host": host})[0] == 200, host


def test_loopback_and_listen_parsing() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("127.0.0.1:8750") == ("127.0.0.1", 8750)
    with pytest.raises(ValueError):
        parse_listen("8750")


def test_token(output: Path, status_doc: Status, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    srv = start(output, status_doc, token=TOKEN)
    try:
        assert srv.url == f"http://127.0.0.1:{srv.port}/?token={TOKEN}"
        assert TOKEN not in srv.base_url
        for path in ("/", "/api/status", "/metrics", "/files/M31/L/preview.png", "/api/events"):
            status, head, body = request(srv, path)
            assert status == 401, path
            assert head["www-authenticate"].startswith("Bearer")
            assert b"SECRET" not in body and b"M31" not in body
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert get_json(srv, "/api/status", **good) == status_doc
        for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}"):
            assert request(srv, "/api/status", headers={"Authorization": wrong})[0] == 401
        assert request(srv, f"/api/status?token={TOKEN}x")[0] == 401
        # Scrapers and scripts may pass the token as a query parameter.
        assert request(srv, f"/metrics?token={TOKEN}")[0] == 200

        # A phone opens the printed link: cookie set, token gone from the address.
        status, head, body = request(srv, f"/?token={TOKEN}&view=M31")
        assert status == 303
        assert head["location"] == "/?view=M31"
        cookie = head["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie
        pair = cookie.split(";", 1)[0]
        assert get_json(srv, "/api/status", Cookie=pair) == status_doc
        assert request(srv, "/", headers={"Cookie": pair})[0] == 200
        assert request(srv, "/files/M31/L/preview.png", headers={"Cookie": pair})[2] == PNG
        name = pair.split("=", 1)[0]
        assert request(srv, "/api/status", headers={"Cookie": f"{name}=forged"})[0] == 401
        assert request(srv, "/api/status", headers={"Cookie": f"{name}={TOKEN}"})[0] == 401
    finally:
        srv.stop()
    access = [r for r in caplog.records if r.name == "subwatch.http"]
    assert any("/api/status" in r.getMessage() for r in access)  # the access log was on
    assert TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()


def test_port_taken(server: WebServer, output: Path) -> None:
    other = WebServer(http_config(f"127.0.0.1:{server.port}"), output, Metrics(), dict)
    with pytest.raises(OSError, match=re.escape(f"127.0.0.1:{server.port}")):
        other.start()
    other.stop()
    assert request(server, "/api/status")[0] == 200  # the first one is unharmed


# -- server-sent events ----------------------------------------------------------------------


class EventStream:
    """A minimal EventSource over http.client."""

    def __init__(self, srv: WebServer, path: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.getheader("Content-Type", "").startswith("text/event-stream")

    def next(self) -> dict[str, str] | None:
        """The next dispatched event (with an ``event`` field), or None at the end."""
        fields: dict[str, str] = {}
        while True:
            line = self.resp.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text == "":
                if "event" in fields:
                    return fields
                fields = {}
                continue
            if text.startswith(":"):
                continue
            key, _, val = text.partition(":")
            fields[key] = val[1:] if val.startswith(" ") else val

    def until(self, kind: str) -> dict[str, str]:
        while True:
            event = self.next()
            assert event is not None, f"stream ended before a {kind} event"
            if event["event"] == kind:
                return event

    def close(self) -> None:
        self.conn.close()


def test_events_push_status_stacks_and_new_rows(
    server: WebServer, output: Path, status_doc: Status
) -> None:
    stream = EventStream(server, "/api/events?since=3")
    try:
        assert json.loads(stream.until("status")["data"]) == status_doc
        stacks = json.loads(stream.until("stacks")["data"])["stacks"]
        assert stacks[0]["target"] == "M31"
        append(output / "frames.jsonl", json.dumps(frame_row(3, status="rejected")) + "\n")
        event = stream.until("frame")
        assert event["id"] == "4"
        doc = json.loads(event["data"])
        assert doc["index"] == 3 and doc["row"]["file"] == "L_003.fits"
        assert doc["row"]["status"] == "rejected"
    finally:
        stream.close()


def test_events_resume_from_last_event_id(server: WebServer) -> None:
    stream = EventStream(server, "/api/events?since=3", headers={"Last-Event-ID": "1"})
    try:
        first, second = stream.until("frame"), stream.until("frame")
        assert [json.loads(e["data"])["index"] for e in (first, second)] == [1, 2]
    finally:
        stream.close()


def test_stop_is_prompt_with_a_live_page_connected(output: Path, status_doc: Status) -> None:
    srv = start(output, status_doc)
    stream = EventStream(srv, "/api/events")
    try:
        stream.until("status")
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive(), "stop() hung with an event stream open"
        while stream.next() is not None:  # the stream ends instead of hanging
            pass
    finally:
        stream.close()
    with pytest.raises(OSError):
        request(srv, "/api/status")
    srv.stop()  # a second stop is harmless
