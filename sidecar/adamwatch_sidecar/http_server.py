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
handler that raises 500 (logged). Handlers run on the server's request threads,
one per connection, so they must be thread-safe.
"""

from __future__ import annotations

import logging
import threading
from email.message import Message as Headers
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

__all__ = ["HttpServer", "Handler", "Route", "parse_address"]

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default of 5 resets scrapes under connection bursts


class HttpServer:
    """A threaded HTTP server with a fixed route table.

    Args:
        address: ``HOST:PORT`` (port 0 picks a free one; see :attr:`port`).
        routes: ``{(method, path): handler}``.
        name: used in log lines and thread names.
        max_body_bytes: larger request bodies are refused with 413.
        request_timeout: seconds a client may take to send its request.
    """

    def __init__(
        self,
        address: str,
        routes: Mapping[Route, Handler],
        *,
        name: str = "http",
        max_body_bytes: int = 1 << 20,
        request_timeout: float = 10.0,
    ):
        self.address = address
        self.routes = dict(routes)
        self.name = name
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
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

            self._httpd = _Server6((host, port), handler_class)
        else:
            self._httpd = _Server((host, port), handler_class)
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

    class RequestHandler(BaseHTTPRequestHandler):
        timeout = server.request_timeout
        server_version = "adamwatch-sidecar"
        sys_version = ""

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
                self._reply(400, "text/plain; charset=utf-8", b"bad Content-Length\n")
                return
            if length < 0 or length > server.max_body_bytes:
                self._reply(413, "text/plain; charset=utf-8", b"request body too large\n")
                return
            body = self.rfile.read(length) if length else b""
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
