"""The status page's routes on the metrics address: the page, its static files and the JSON API.

    page = StatusPage(sidecar.state)                 # listens to the run state from now on
    routes.update(page.routes())                     # GET /, /static/..., /api/v1/{series,events,trainers}
    sidecar.add_ticker(page.on_tick)                 # forgets trainers the run state expired
    page.follow_remediation(service)                 # audit records reach the timeline

Everything the browser loads is served from the package (``static/``, shipped in
the wheel); the page's Content-Security-Policy allows requests to this origin
only, so nothing leaves the pod. Every route is a GET: the page cannot act.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Callable, Iterator

from adamwatch import wire

from ..run_state import RunState
from .api import JSON, ApiError, StatusApi
from .events import EventLog
from .history import HistoryLimits, StepHistory

__all__ = ["StatusPage", "STATIC_PACKAGE", "iter_static_files"]

log = logging.getLogger(__name__)

STATIC_PACKAGE = "adamwatch_sidecar.status_page"
_STEP = wire.MessageType.STEP
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}


def iter_static_files() -> Iterator[tuple[str, bytes]]:
    """Every file of the page as (path under ``static/``, content), from the installed package.

    Returns:
        an iterator of ``("app.js", b"...")``, ``("vendor/uplot/uPlot.iife.min.js", b"...")``, ...
    """

    def walk(folder: Traversable, prefix: str) -> Iterator[tuple[str, bytes]]:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                yield from walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                yield prefix + entry.name, entry.read_bytes()

    yield from walk(resources.files(STATIC_PACKAGE).joinpath("static"), "")


def _content_type(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    suffix = name[name.rfind("."):] if "." in name else ""
    return _CONTENT_TYPES.get(suffix, "application/octet-stream")


class StatusPage:
    """The page, its history and its API for one sidecar.

    Args:
        state: the sidecar's run state (the page adds its listeners to it).
        clock: unix seconds.
        history_limits: the history's memory bound (default :class:`HistoryLimits`).
        events: the event log (default: a new one on ``clock``).
    """

    def __init__(self, state: RunState, *, clock: Callable[[], float] = time.time,
                 history_limits: HistoryLimits | None = None, events: EventLog | None = None):
        self.state = state
        self.history = StepHistory(history_limits)
        self.events = events or EventLog(clock)
        self.remediation: Any = None
        self.api = StatusApi(state, self.history, self.events, lambda: self.remediation, clock)
        self._static = {path: (_content_type(path), body) for path, body in iter_static_files()}
        if "index.html" not in self._static:
            raise FileNotFoundError(f"{STATIC_PACKAGE}/static/index.html is not installed")
        state.add_listener(self.on_message)

    def on_message(self, key: Any, message: Any) -> None:
        """Run-state listener (one call per accepted message, on the ingest loop): steps to the history,
        everything else to both."""
        if message is not None and message.type is _STEP:
            self.history.on_step(key, message.payload)
            return
        self.history.on_message(key, message)
        self.events.on_message(key, message)

    def follow_remediation(self, service: Any) -> None:
        """Show ``service``'s audit trail and ladder state (called by ``remediation.wiring.attach``).

        Args:
            service: a ``RemediationService`` (its ``audit`` gets a listener; ``status()`` is read per request).
        """
        self.remediation = service
        service.audit.add_listener(self.events.on_audit)

    def on_tick(self, now: float) -> None:
        """Sidecar ticker: drop the history of trainers the run state has expired."""
        gone = self.history.retain(self.state.keys())
        if gone:
            self.events.forget(gone)

    # ------------------------------------------------------------------ routes
    def routes(self) -> dict[tuple[str, str], Callable[..., tuple[int, str, bytes]]]:
        """``{(method, path): handler}`` for the metrics server: the page, its files, the API."""
        routes: dict[tuple[str, str], Callable[..., tuple[int, str, bytes]]] = {
            ("GET", "/"): self._file_handler("index.html"),
            ("GET", "/api/v1/series"): self._api_handler(self.api.series),
            ("GET", "/api/v1/events"): self._api_handler(self.api.events_json),
            ("GET", "/api/v1/trainers"): self._api_handler(self.api.trainers_json),
        }
        for path in self._static:
            routes[("GET", "/static/" + path)] = self._file_handler(path)
        return routes

    def _file_handler(self, path: str) -> Callable[[Any, bytes], tuple[int, str, bytes]]:
        content_type, body = self._static[path]

        def serve(headers: Any, request_body: bytes) -> tuple[int, str, bytes]:
            return 200, content_type, body

        return serve

    @staticmethod
    def _api_handler(answer: Callable[[str], str]) -> Callable[..., tuple[int, str, bytes]]:
        def handle(headers: Any, body: bytes, query: str = "") -> tuple[int, str, bytes]:
            try:
                return 200, JSON, answer(query).encode()
            except ApiError as exc:
                import json

                return exc.status, JSON, json.dumps({"error": str(exc)}).encode()

        handle.takes_query = True  # type: ignore[attr-defined]  # see http_server: handler(headers, body, query)
        return handle
