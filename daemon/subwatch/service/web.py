"""The HTTP side: live page, JSON API, server-sent events, output files and Prometheus metrics.

The daemon's worker is synchronous (one frame at a time, numpy all the way), so the server
runs beside it in a thread of its own with its own asyncio loop: ``WebServer.start`` returns
once the socket listens, ``stop`` closes it within about two seconds even with live pages
connected. The server only *reads*: the journal (``frames.jsonl``), the stacks' ``status.json``
and preview images under the output folder, the daemon's ``status()`` callable and the
``Metrics`` registry. Every method but GET and HEAD is refused.

Routes:

- ``/`` and ``/static/<name>``: the live page (plain HTML, JS and CSS shipped in the package);
- ``/metrics``: the Prometheus exposition;
- ``/api/status``: the daemon's live status as JSON;
- ``/api/frames?since=N&limit=L``: journal rows from row index N on, as
  ``{"next": M, "frames": [...], "more": bool}``; a torn last line is not a row yet, a corrupt
  line counts as a row but is left out; ``reset: true`` says the journal shrank (a restart cut
  it back to its checkpoint) and the client should read again from 0;
- ``/api/stacks``: each ``<target>/<filter>/`` folder with its ``status.json`` and the preview
  products present (with their modification times, for cache busting);
- ``/api/events``: server-sent events: ``frame`` (one new journal row, ``id`` = next row
  index, so a reconnecting ``EventSource`` resumes where it stopped), ``status``, ``stacks``
  and ``reset``; a comment every 15 s keeps proxies and phones from dropping the stream;
- ``/files/<target>/<filter>/<name>``: a PNG, JPEG, JSON or FITS product from the output folder.

Security. Bound to loopback (the default ``127.0.0.1:8750``) the server is only reachable from
the machine itself, and without a token it also refuses requests whose ``Host`` is not a
loopback name, so a web page elsewhere cannot read it by pointing its own domain at
127.0.0.1 (DNS rebinding). Any other address exposes the night's data and the machine's disk layout
to a network, so it is refused unless ``http.token`` is set. With a token, every request must
carry it: ``Authorization: Bearer TOKEN`` (Prometheus, scripts), a ``?token=TOKEN`` query (the
API and metrics only), or the session cookie the page sets: opening ``/?token=TOKEN`` on a
phone sets an HttpOnly, SameSite=Strict cookie (an HMAC of the token, not the token) and
redirects to the same address without the token, so it does not stay in the address bar or
the history. Comparisons are constant-time. The access log is our own and prints the path
only, never the query string, where a token may be. File names are checked segment by segment
against the characters stack folders are made of, only known suffixes are served, and the
resolved path (symlinks followed) must lie inside the output folder. Responses carry a
Content-Security-Policy that allows nothing but this origin, ``nosniff``, ``no-referrer`` and
``no-store`` for the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from subwatch.config import HttpConfig
from subwatch.service.metrics import Metrics

__all__ = ["PRODUCTS", "Journal", "WebServer"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
PRODUCTS = ("preview", "denoised", "deconvolved")
COOKIE = "subwatch_session"
COOKIE_MAX_AGE = 30 * 24 * 3600
FRAMES_DEFAULT_LIMIT = 500
FRAMES_MAX_LIMIT = 2000
HEARTBEAT_SECONDS = 15.0
POLL_SECONDS = 0.5
STATUS_SECONDS = 2.0
SHUTDOWN_SECONDS = 1.0

FILE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".json": "application/json",
    ".fits": "application/fits",
}
STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The characters of stack folder names (``subwatch.stack.safe_name``) and product names; no
# leading dot, so ``..``, hidden files and the ``.checkpoint`` folder are out by construction.
_SEGMENT = re.compile(r"[A-Za-z0-9+_-][A-Za-z0-9+._-]{0,199}")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self';"
        " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) into host and port; port 0 picks a free port."""
    text = listen.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"http.listen must be HOST:PORT, e.g. 127.0.0.1:8750, not {listen!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as a network address


def _loopback_host_header(value: str | None) -> bool:
    """A request's ``Host`` names this machine's loopback (or is absent, as in HTTP/1.0)."""
    if not value:
        return True
    host = value.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback(host.rstrip("."))


def _display_host(host: str) -> str:
    """A host a person can open: the LAN address for a wildcard bind, brackets for IPv6."""
    if host in ("0.0.0.0", "::", ""):
        family = socket.AF_INET6 if host == "::" else socket.AF_INET
        probe = "2001:db8::1" if host == "::" else "192.0.2.1"  # documentation ranges
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))  # UDP connect sends nothing; it picks the route
                host = sock.getsockname()[0]
        except OSError:
            host = "::1" if host == "::" else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (browsers' JSON.parse refuses NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _clean(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist):
        return _clean(tolist())
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(_clean(value), default=_json_default, allow_nan=False)


def _json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(text=dumps(value), status=status, content_type="application/json")


def _text(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


class _AccessLog(AbstractAccessLogger):
    """Method, path and status at DEBUG: never the query string, which may hold the token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug("%s %s %s %.3fs", request.method, request.path, response.status, time)


# --------------------------------------------------------------------------------------------
# The journal, indexed by row
# --------------------------------------------------------------------------------------------


class Journal:
    """Row index over ``frames.jsonl``, grown incrementally as the daemon appends.

    Row ``i`` is the ``i``-th newline-terminated line; a last line without its newline is
    still being written and is not a row yet. The index notices a journal that was replaced
    (another inode), cut back (smaller than indexed, or its last indexed line changed) and
    starts again; ``reset`` counts those, so readers can tell their row numbers went stale.
    Used from the server's loop thread only.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offsets: list[int] = []  # start of each complete line
        self.end = 0  # byte after the last complete line
        self.ident: tuple[int, int] | None = None
        self.tail = b""  # the last complete line, to notice a rewrite
        self.resets = 0

    def _clear(self) -> None:
        if self.offsets:
            self.resets += 1
        self.offsets, self.end, self.tail = [], 0, b""

    def refresh(self) -> int:
        """Index lines appended since the last call; returns the number of complete rows."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below, several reads
        except FileNotFoundError:
            self._clear()
            self.ident = None
            return 0
        with fh:
            st = os.fstat(fh.fileno())
            ident = (st.st_dev, st.st_ino)
            if ident != self.ident or st.st_size < self.end:
                self._clear()
            elif self.offsets:
                fh.seek(self.offsets[-1])
                if fh.read(self.end - self.offsets[-1]) != self.tail:
                    self._clear()
            self.ident = ident
            if st.st_size > self.end:
                fh.seek(self.end)
                data = fh.read(st.st_size - self.end)
                start = 0
                while (stop := data.find(b"\n", start)) >= 0:
                    self.offsets.append(self.end + start)
                    self.tail = data[start : stop + 1]
                    start = stop + 1
                self.end += start
        return len(self.offsets)

    def rows(self, since: int, limit: int) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
        """Rows ``since`` .. ``since + limit - 1`` that parse, with their indices; and the
        index after the last row read."""
        total = len(self.offsets)
        since = max(0, min(since, total))
        stop = min(total, since + max(0, limit))
        if stop <= since:
            return since, []
        first = self.offsets[since]
        last = self.offsets[stop] if stop < total else self.end
        try:
            with open(self.path, "rb") as fh:
                fh.seek(first)
                data = fh.read(last - first)
        except OSError:
            return since, []
        out: list[tuple[int, dict[str, Any]]] = []
        for index, line in enumerate(data.split(b"\n")[: stop - since], start=since):
            try:
                row = json.loads(line)
            except ValueError:  # a damaged line (power cut, repaired tail): skip it
                continue
            if isinstance(row, dict):
                out.append((index, row))
        return stop, out


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class WebServer:
    """The live page, API and metrics of one daemon, served from a thread of its own."""

    def __init__(
        self,
        http: HttpConfig,
        output: Path,
        metrics: Metrics,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.host, self._want_port = parse_listen(http.listen)
        self._token: bytes | None = http.token.encode() if http.token else None
        if self._token is None and not is_loopback(self.host):
            raise ValueError(
                f"http.listen {http.listen} is reachable from the network; set http.token to"
                " a secret (the page is then opened with ?token=...), or listen on"
                " 127.0.0.1 and reach it through an SSH tunnel"
            )
        self._cookie = (
            hmac.new(self._token, b"subwatch session cookie", hashlib.sha256).hexdigest()
            if self._token is not None
            else ""
        )
        self.output = Path(output)
        self.metrics = metrics
        self._status = status
        self.port = 0
        self.url = ""
        self.base_url = ""  # the same address without the token, safe to log
        self._assets = {
            p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in STATIC_TYPES
        }
        self._journal = Journal(self.output / "frames.jsonl")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._stacks_cache: dict[Path, tuple[int, dict[str, Any] | None]] = {}

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; returns once the server accepts connections.

        Raises ``OSError`` naming the address when it cannot be bound (port taken, address
        not on this machine).
        """
        if self._thread is not None:
            raise RuntimeError("WebServer already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="subwatch-web", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=30)
        except OSError as exc:
            self._halt()
            where = f"{self.host}:{self._want_port}"
            raise OSError(
                exc.errno,
                f"cannot listen on {where}: {exc.strerror or exc}; is another subwatch"
                " running there? choose another address with http.listen or --http",
            ) from exc
        except BaseException:
            self._halt()
            raise
        shown = f"http://{_display_host(self.host)}:{self.port}/"
        self.base_url = shown
        self.url = shown + (f"?token={quote(self._token.decode(), safe='')}" if self._token else "")
        log.info("serving the live page, API and metrics on %s", self.base_url)

    def stop(self) -> None:
        """Close the listener and every connection (live pages too); about a second."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        if self._runner is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(timeout=SHUTDOWN_SECONDS + 2.0)
            except Exception:  # a connection that will not close must not block the daemon
                log.warning("the HTTP server did not stop cleanly", exc_info=True)
        self._halt()

    def _halt(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=2.0)
        self._loop = self._thread = self._runner = None

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(self._headers)
        app.on_shutdown.append(self._on_shutdown)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/api/frames", self._api_frames)
        app.router.add_get("/api/stacks", self._api_stacks)
        app.router.add_get("/api/events", self._api_events)
        app.router.add_get("/files/{target}/{filter}/{name}", self._file)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log_class=_AccessLog,
            access_log=logging.getLogger("subwatch.http"),
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._want_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- every request -----------------------------------------------------------------------

    @web.middleware
    async def _guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _text(405, "read-only: GET and HEAD only", Allow="GET, HEAD")
        if self._token is None and not _loopback_host_header(request.headers.get("Host")):
            # Without a token only this machine may ask; a page elsewhere that points its
            # own name at 127.0.0.1 (DNS rebinding) still sends that name as Host.
            return _text(403, "forbidden: set http.token to serve other host names")
        if self._token is not None:
            denied = self._authorise(request)
            if denied is not None:
                return denied
        return await handler(request)

    def _authorise(self, request: web.Request) -> web.StreamResponse | None:
        """None when the request carries the token; else the response to send."""
        assert self._token is not None
        query = request.rel_url.query
        if "token" in query:
            if not hmac.compare_digest(query.get("token", "").encode(), self._token):
                return self._unauthorised()
            if request.path != "/":
                return None  # API and metrics: the query itself authorises the request
            kept = [(k, v) for k, v in query.items() if k != "token"]
            response = web.Response(
                status=303, headers={"Location": str(request.rel_url.with_query(kept))}
            )
            response.set_cookie(
                COOKIE,
                self._cookie,
                max_age=COOKIE_MAX_AGE,
                path="/",
                httponly=True,
                samesite="Strict",
                secure=request.secure,
            )
            return response
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self._token
        ):
            return None
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._cookie.encode()):
            return None
        return self._unauthorised()

    @staticmethod
    def _unauthorised() -> web.Response:
        return _text(
            401,
            "unauthorised: open the page with ?token=TOKEN or send 'Authorization: Bearer TOKEN'",
            **{"WWW-Authenticate": 'Bearer realm="subwatch"'},
        )

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith(("/files/", "/static/")) or request.path == "/":
            response.headers.setdefault("Cache-Control", "no-cache")
        else:
            response.headers["Cache-Control"] = "no-store"

    # -- the page ----------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self._asset("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return self._asset(request.match_info["name"])

    def _asset(self, name: str) -> web.StreamResponse:
        path = self._assets.get(name)
        if path is None:
            return _text(404, "not found")
        return web.FileResponse(path, headers={"Content-Type": STATIC_TYPES[path.suffix]})

    # -- the API -----------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _status_doc(self) -> dict[str, Any]:
        try:
            doc = self._status()
        except Exception as exc:  # the page must keep working if the daemon's status fails
            log.debug("status() failed", exc_info=True)
            return {"error": f"status unavailable: {type(exc).__name__}"}
        return doc if isinstance(doc, dict) else {"status": doc}

    async def _api_status(self, request: web.Request) -> web.StreamResponse:
        return _json_response(self._status_doc())

    async def _api_frames(self, request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", str(FRAMES_DEFAULT_LIMIT)))
        except ValueError:
            return _json_response({"error": "since and limit must be integers"}, 400)
        if since < 0 or limit < 1:
            return _json_response({"error": "since must be >= 0 and limit >= 1"}, 400)
        limit = min(limit, FRAMES_MAX_LIMIT)
        total = self._journal.refresh()
        doc: dict[str, Any] = {}
        if since > total:
            doc["reset"] = True  # the journal is shorter than the client thinks: start over
        nxt, rows = self._journal.rows(since, limit)
        doc.update(next=nxt, frames=[row for _, row in rows], more=nxt < total)
        return _json_response(doc)

    async def _api_stacks(self, request: web.Request) -> web.StreamResponse:
        return _json_response({"stacks": self._stacks()})

    def _stacks(self) -> list[dict[str, Any]]:
        """Every ``<target>/<filter>`` folder with a status.json or a preview, sorted."""
        out: list[dict[str, Any]] = []
        try:
            root = self.output.resolve()
            targets = sorted(p for p in self.output.iterdir() if p.is_dir())
        except OSError:
            return out
        for target in targets:
            if not _SEGMENT.fullmatch(target.name) or target.name == "masters":
                continue
            try:
                filters = sorted(p for p in target.iterdir() if p.is_dir())
            except OSError:
                continue
            for folder in filters:
                if not _SEGMENT.fullmatch(folder.name):
                    continue
                if not folder.resolve().is_relative_to(root):
                    continue  # a link out of the output folder: its files are not served
                entry = self._stack_entry(target.name, folder)
                if entry is not None:
                    out.append(entry)
        return out

    def _stack_entry(self, target: str, folder: Path) -> dict[str, Any] | None:
        products: dict[str, dict[str, Any]] = {}
        for product in PRODUCTS:
            path = folder / f"{product}.png"
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            version = str(mtime)
            products[product] = {
                "url": f"files/{target}/{folder.name}/{product}.png?v={version}",
                "mtime": mtime / 1e9,
            }
        status = self._read_status(folder / "status.json")
        if status is None and not products:
            return None
        return {"target": target, "filter": folder.name, "status": status, "products": products}

    def _read_status(self, path: Path) -> dict[str, Any] | None:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            self._stacks_cache.pop(path, None)
            return None
        cached = self._stacks_cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        doc: dict[str, Any] | None = None
        try:
            if path.resolve().is_relative_to(self.output.resolve()):
                loaded = json.loads(path.read_text(encoding="utf-8"))
                doc = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            doc = None  # written atomically, so this is a foreign or damaged file
        self._stacks_cache[path] = (mtime, doc)
        return doc

    async def _api_events(self, request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(headers={"Content-Type": "text/event-stream"})
        assert self._stopping is not None
        stopping = self._stopping
        total = self._journal.refresh()
        try:
            since = int(request.headers.get("Last-Event-ID") or request.query["since"])
        except (KeyError, ValueError):
            since = total  # no position given: from now on
        resets = self._journal.resets
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        last_write = loop.time()
        next_status = 0.0
        sent_status = sent_stacks = ""

        async def send(text: str) -> None:
            nonlocal last_write
            await response.write(text.encode())
            last_write = loop.time()

        try:
            await send("retry: 3000\n\n")
            if since > total:
                await send("event: reset\ndata: {}\n\n")
                since = 0
            while not stopping.is_set():
                total = self._journal.refresh()
                if self._journal.resets != resets:
                    resets = self._journal.resets
                    since = 0
                    await send("event: reset\ndata: {}\n\n")
                while since < total:
                    nxt, rows = self._journal.rows(since, FRAMES_DEFAULT_LIMIT)
                    for index, row in rows:
                        data = dumps({"index": index, "row": row})
                        await send(f"id: {index + 1}\nevent: frame\ndata: {data}\n\n")
                    if nxt == since:
                        break
                    since = nxt
                    await send(f"id: {since}\n\n")  # past skipped lines too
                now = loop.time()
                if now >= next_status:
                    next_status = now + STATUS_SECONDS
                    status = dumps(self._status_doc())
                    if status != sent_status:
                        sent_status = status
                        await send(f"event: status\ndata: {status}\n\n")
                    stacks = dumps({"stacks": self._stacks()})
                    if stacks != sent_stacks:
                        sent_stacks = stacks
                        await send(f"event: stacks\ndata: {stacks}\n\n")
                if now - last_write >= HEARTBEAT_SECONDS:
                    await send(": keep-alive\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), POLL_SECONDS)
        except (ConnectionError, RuntimeError):
            pass  # the page went away (or the server is closing the connection)
        return response

    # -- output files ------------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        parts = [request.match_info[k] for k in ("target", "filter", "name")]
        if not all(_SEGMENT.fullmatch(part) for part in parts):
            return _text(403, "forbidden")
        suffix = Path(parts[2]).suffix.lower()
        content_type = FILE_TYPES.get(suffix)
        if content_type is None:
            return _text(403, "forbidden")
        root = self.output.resolve()
        try:
            path = self.output.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):
            return _text(404, "not found")
        if not path.is_relative_to(root):
            log.warning("refused %s: it leads out of the output folder", request.path)
            return _text(403, "forbidden")
        if not path.is_file():
            return _text(404, "not found")
        headers = {"Content-Type": content_type}
        if suffix == ".fits":
            headers["Content-Disposition"] = f'attachment; filename="{parts[2]}"'
        return web.FileResponse(path, headers=headers)
