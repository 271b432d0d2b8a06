"""A small threaded HTTP server driven by a route table.

The metrics server (/metrics, /healthz, /readyz) and the control server (the
Alertmanager webhook and the ``ctl`` API) are both instances of
:class:`HttpServer`, each on its own address with its own routes::

    def status(headers, body):
        return 200, "application/json", b'{"ok": true}'

    server = HttpServer("127.0.0.1:0", {("GET", "/api/v1/status"): status})
    server.start()            # serves on a background thread
    server.url                # "http://127.0.0.1:PORT"
    server.stop()

A handler is ``handler(headers, body) -> (status, content_type, body)``:

- ``headers`` is the request's ``email.message.Message`` (case-insensitive
  ``headers.get("Authorization")``);
- ``body`` is the request body (``b""`` for GET), at most ``max_body_bytes``;
- it returns the status code, the content type and the response bytes.

Routes match the exact path. A handler with the attribute ``takes_query = True``
is called as ``handler(headers, body, query)`` with the raw query string (``""``
when none); others never see it. An unknown path gets
404, a known path with another method 405, a body over the limit 413 and a
handler that raises 500 (logged). Handlers run on a bounded pool of request
threads (``workers``; further connections wait in the accept queue), so they
must be thread-safe.

Slow clients cannot hold a thread: the request line and headers must arrive
within ``header_timeout`` seconds and the body within ``body_timeout``, as
absolute deadlines (a byte every few seconds does not extend them). An
``authorize(headers, method, path)`` hook, when given, runs before the body is
read: a refusal it returns is sent without reading the body. Refusals before a
handler runs are reported to ``on_reject(reason)`` with one of
:data:`HTTP_REJECT_REASONS`.
"""

from __future__ import annotations

import io
import logging
import queue
import socket
import threading
import time
from email.message import Message as Headers
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Mapping

__all__ = ["HttpServer", "Handler", "Route", "parse_address", "HTTP_REJECT_REASONS"]

# Why a request was refused before any handler ran
# (adamwatch_sidecar_http_requests_rejected_total{reason}).
HTTP_REJECT_REASONS: tuple[str, ...] = ("header_timeout", "body_timeout", "bad_request", "too_large")

log = logging.getLogger(__name__)

Handler = Callable[[Headers, bytes], "tuple[int, str, bytes]"]
Route = tuple[str, str]  # (method, path)


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT`` for every interface).

    Raises:
        ValueError: naming what is wrong with the address.
    """
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"must be HOST:PORT like 0.0.0.0:9400, got {text!r}")
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number (in {text!r})") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (in {text!r})")
    return host, port


class _Server(HTTPServer):
    """An HTTP server whose requests run on a fixed pool of worker threads."""

    allow_reuse_address = True
    request_queue_size = 128  # the default of 5 resets scrapes under connection bursts
    workers = 16

    def server_activate(self) -> None:
        super().server_activate()
        # A bounded hand-off: when every worker is busy the accept loop waits,
        # and new connections wait in the kernel's accept queue.
        self._requests: "queue.Queue[Any]" = queue.Queue(maxsize=self.workers)
        self._pool = [threading.Thread(target=self._work, name=f"http-worker-{i}", daemon=True)
                      for i in range(self.workers)]
        for thread in self._pool:
            thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._requests.put((request, client_address))

    def _work(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        for _ in self._pool:
            try:
                self._requests.put_nowait(None)
            except queue.Full:
                break


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once an absolute deadline has passed (slow-loris clients)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None
        self.phase = ""
        self.expired = ""
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = self.phase
                raise TimeoutError(f"{self.phase} deadline passed")
            self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buffer)
            self.received += n
            return n
        except TimeoutError:
            self.expired = self.phase
            raise


class HttpServer:
    """A threaded HTTP server with a fixed route table.

    Args:
        address: ``HOST:PORT`` (port 0 picks a free one; see :attr:`port`).
        routes: ``{(method, path): handler}``.
        name: used in log lines and thread names.
        max_body_bytes: larger request bodies are refused with 413.
        request_timeout: seconds a client may take to send its request line and
            headers (an absolute deadline).
        body_timeout: seconds a client may take to send its body.
        workers: request threads.
        authorize: ``fn(headers, method, path)`` run before the body is read;
            returns a response to refuse the request, or None.
        on_reject: ``fn(reason)`` for each request refused before a handler ran.
    """

    def __init__(
        self,
        address: str,
        routes: Mapping[Route, Handler],
        *,
        name: str = "http",
        max_body_bytes: int = 1 << 20,
        request_timeout: float = 10.0,
        body_timeout: float = 10.0,
        workers: int = 16,
        authorize: Callable[[Headers, str, str], "tuple[int, str, bytes] | None"] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ):
        self.address = address
        self.routes = dict(routes)
        self.name = name
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.body_timeout = body_timeout
        self.workers = workers
        self.authorize = authorize
        self.on_reject = on_reject
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._httpd is None:
            raise RuntimeError(f"{self.name} server is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the bound socket (after :meth:`start`)."""
        if self._httpd is None:
            raise RuntimeError(f"{self.name} server is not started")
        host = self._httpd.server_address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve on a daemon thread.

        Raises:
            OSError: the address cannot be bound (in use, not local, ...).
        """
        host, port = parse_address(self.address)
        handler_class = _make_handler(self)
        if ":" in host:
            import socket

            class _Server6(_Server):
                address_family = socket.AF_INET6
                workers = self.workers

            self._httpd = _Server6((host, port), handler_class)
        else:
            class _ServerN(_Server):
                workers = self.workers

            self._httpd = _ServerN((host, port), handler_class)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name=f"{self.name}-http", daemon=True
        )
        self._thread.start()
        log.info("%s server listening on %s", self.name, self.url)

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _make_handler(server: HttpServer) -> type[BaseHTTPRequestHandler]:
    routes = server.routes
    paths = {path for _, path in routes}

    def reject(reason: str) -> None:
        if server.on_reject is not None:
            try:
                server.on_reject(reason)
            except Exception:
                log.exception("%s server: could not count a rejected request", server.name)

    class RequestHandler(BaseHTTPRequestHandler):
        timeout = server.request_timeout
        server_version = "adamwatch-sidecar"
        sys_version = ""

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the stock reader holds a reference that would keep the socket open
            self._reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self._reader)

        def handle_one_request(self) -> None:
            reader = self._reader
            reader.phase, reader.expired, reader.received = "header", "", 0
            reader.deadline = time.monotonic() + server.request_timeout
            try:
                super().handle_one_request()
            finally:
                reader.deadline = None
            if reader.expired:
                # An idle keep-alive connection that times out before a new
                # request line is not an error; a started request is.
                if reader.expired == "body" or reader.received:
                    reject(f"{reader.expired}_timeout")
                self.close_connection = True

        def _dispatch(self, method: str) -> None:
            path, _, query = self.path.partition("?")
            handler = routes.get((method, path))
            if handler is None:
                if path in paths:
                    allowed = ", ".join(sorted(m for m, p in routes if p == path))
                    self._reply(405, "text/plain; charset=utf-8", b"method not allowed\n", {"Allow": allowed})
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"not found\n")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                reject("bad_request")
                self.close_connection = True
                self._reply(400, "text/plain; charset=utf-8", b"bad Content-Length\n")
                return
            if length < 0 or length > server.max_body_bytes:
                reject("too_large")
                self.close_connection = True
                self._reply(413, "text/plain; charset=utf-8", b"request body too large\n")
                return
            if server.authorize is not None:
                denied = server.authorize(self.headers, method, path)
                if denied is not None:
                    self.close_connection = True  # the unread body must not be parsed as a request
                    self._reply(*denied)
                    return
            self._reader.phase = "body"
            self._reader.deadline = time.monotonic() + server.body_timeout
            body = self.rfile.read(length) if length else b""
            self._reader.deadline = None
            if len(body) < length:
                self.close_connection = True
                return
            try:
                if getattr(handler, "takes_query", False):
                    status, content_type, payload = handler(self.headers, body, query)
                else:
                    status, content_type, payload = handler(self.headers, body)
            except Exception:
                log.exception("%s server: handler for %s %s failed", server.name, method, path)
                self._reply(500, "text/plain; charset=utf-8", b"internal error\n")
                return
            self._reply(status, content_type, payload)

        def _reply(self, status: int, content_type: str, body: bytes, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._dispatch("DELETE")

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            log.debug("%s %s - %s", server.name, self.address_string(), format % args)

    return RequestHandler
