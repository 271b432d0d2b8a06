"""The sidecar's composition root: run state, ingest server, metrics HTTP server, tickers.

    sidecar = Sidecar(load_config("sidecar.yaml"))
    sidecar.state.add_listener(on_message)      # fn(key, message | None), on the ingest loop
    sidecar.add_ticker(on_tick)                 # fn(now), once a second, on the ingest loop
    sidecar.add_http_server(control_server)     # started and stopped with the sidecar
    sidecar.serve_forever()                     # until SIGTERM/SIGINT; then a clean stop

Listeners and tickers run on the ingest event-loop thread, one at a time, so
components built on them need no locks between them; they must return quickly
(a blocked listener stalls ingest). ``sidecar.ingest.send_command(key, payload)``
is safe from any thread, and :meth:`Sidecar.call_soon` runs a function on the
loop thread from elsewhere (e.g. from an HTTP handler).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Any, Callable

from adamwatch import wire
from prometheus_client import CollectorRegistry

from .admission import Admission, read_secret
from .collector import CONTENT_TYPE, RunStateCollector
from .config import SidecarConfig
from .http_server import HTTP_REJECT_REASONS, HttpServer
from .ingest import IngestServer
from .nan_origin import NanOriginTracker
from .replica_check import ReplicaCheck
from .run_state import RunState
from .status_page import StatusPage
from .extras_export import StepExtrasExporter

__all__ = ["Sidecar", "Ticker"]

log = logging.getLogger(__name__)

Ticker = Callable[[float], None]


class Sidecar:
    """One sidecar process's components, wired together.

    Args:
        config: validated settings.
        clock: unix seconds, for the run state and tickers (injected in tests).
        tick_interval: seconds between ticker rounds.

    Attributes:
        config: the settings.
        state: the :class:`RunState` (listeners, generic metric store).
        ingest: the :class:`IngestServer` (``send_command``).
        collector: the :class:`RunStateCollector` behind /metrics.
        registry: a private ``CollectorRegistry`` holding only ``collector``.
        metrics_server: the :class:`HttpServer` for /metrics, /healthz, /readyz and the status page.
        status_page: the :class:`StatusPage` (``GET /``, ``/api/v1/series``, ``/api/v1/events``, ...).
    """

    def __init__(self, config: SidecarConfig, *, clock: Callable[[], float] = time.time, tick_interval: float = 1.0):
        self.config = config
        self._clock = clock
        self.clock = clock  # public: components that count time use the sidecar's clock
        self.tick_interval = tick_interval
        self.state = RunState(config.retention_seconds, clock)
        secret = read_secret(config.secret_file) if config.secret_file else None
        admission = Admission(config.allowed_uids, config.allowed_gids, secret, config.max_trainers,
                              config.max_series_per_trainer)
        self.ingest = IngestServer(self.state, config.listen, config.max_frame_bytes, admission=admission,
                                   socket_mode=config.socket_mode, socket_group=config.socket_group,
                                   max_buffered_bytes=config.max_buffered_bytes,
                                   partial_frame_timeout=config.partial_frame_timeout_seconds)
        self.collector = RunStateCollector(self.state)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self.collector)
        for reason in HTTP_REJECT_REASONS:
            self.state.inc_global("adamwatch_sidecar_http_requests_rejected_total", {"reason": reason}, 0)
        self.status_page = StatusPage(self.state, clock=clock)
        self.metrics_server = HttpServer(
            config.metrics_address,
            {
                ("GET", "/metrics"): self._metrics,
                ("GET", "/healthz"): self._healthz,
                ("GET", "/readyz"): self._readyz,
                **self.status_page.routes(),
            },
            name="metrics",
            workers=config.http_workers,
            on_reject=self.count_http_rejection,
        )
        self._tickers: list[Ticker] = [self.state.expire, self.status_page.on_tick]
        # Where a NaN began under torch.distributed (STEP extras of adamwatch.cross_rank).
        self.nan_origin = NanOriginTracker(self.state)
        self.state.add_listener(self.nan_origin.on_message)
        # Replica fingerprints of the ranks this sidecar sees (the audit log is
        # attached with remediation, see cli).
        self.replica_check = ReplicaCheck(self.state)
        self.state.add_listener(self.replica_check.on_message, types=(wire.MessageType.FINGERPRINT,))
        # Spike guard and GradScaler extras of each STEP -> their metrics.
        self.step_extras = StepExtrasExporter(self.state)
        self.state.add_listener(self.step_extras.on_message)
        self._servers: list[HttpServer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._started = False

    def count_http_rejection(self, reason: str) -> None:
        """Count an HTTP request refused before its handler ran (any server of this sidecar)."""
        self.state.inc_global("adamwatch_sidecar_http_requests_rejected_total", {"reason": reason})

    # ------------------------------------------------------------------ extension points
    def add_ticker(self, fn: Ticker) -> None:
        """Call ``fn(now)`` about once a second on the ingest loop; exceptions are logged.

        Args:
            fn: takes the clock's unix seconds; must return quickly.
        """
        self._tickers.append(fn)

    def add_http_server(self, server: HttpServer) -> None:
        """Start ``server`` with the sidecar (now, if already started) and stop it with it."""
        self._servers.append(server)
        if self._started:
            server.start()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the ingest loop thread (safe from any thread)."""
        if self._loop is None:
            raise RuntimeError("the sidecar is not started")
        self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ HTTP handlers
    def _metrics(self, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, self.collector.render_text()

    def _healthz(self, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        return 200, "text/plain; charset=utf-8", b"ok\n"

    def _readyz(self, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        if self.ingest.listening:
            return 200, "text/plain; charset=utf-8", f"ready: ingest on {self.ingest.endpoint}\n".encode()
        return 503, "text/plain; charset=utf-8", b"not ready: ingest is not listening\n"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start serving: metrics HTTP first (so /healthz answers), then ingest, then tickers.

        Raises:
            OSError: an address or socket cannot be bound (everything started is stopped).
        """
        if self._started:
            return
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="ingest-loop", daemon=True)
        self._loop_thread.start()
        try:
            self.metrics_server.start()
            asyncio.run_coroutine_threadsafe(self.ingest.start(), self._loop).result(timeout=10)
            for server in self._servers:
                server.start()
        except BaseException:
            self._shutdown()
            raise
        self._started = True
        self._loop.call_soon_threadsafe(self._schedule_tick)
        log.info("adamwatch-sidecar ready: ingest=%s metrics=%s", self.ingest.endpoint, self.metrics_server.url)

    def _schedule_tick(self) -> None:
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        now = self._clock()
        for fn in list(self._tickers):
            try:
                fn(now)
            except Exception:
                log.exception("ticker %r failed", fn)
        self._schedule_tick()

    def stop(self) -> None:
        """Stop everything and remove the socket file (idempotent)."""
        if not self._started:
            return
        self._started = False
        self._shutdown()
        self._stopped.set()
        log.info("adamwatch-sidecar stopped")

    def _shutdown(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            def cancel_tick() -> None:
                if self._tick_handle is not None:
                    self._tick_handle.cancel()

            loop.call_soon_threadsafe(cancel_tick)
            try:
                asyncio.run_coroutine_threadsafe(self.ingest.stop(), loop).result(timeout=5)
            except Exception:
                log.exception("ingest did not stop cleanly")
        for server in reversed(self._servers):
            try:
                server.stop()
            except Exception:
                log.exception("%s server did not stop cleanly", server.name)
        self.metrics_server.stop()
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=5)
            if not loop.is_running():
                loop.close()
        self._loop = None

    def serve_forever(self) -> None:
        """Start, block until SIGTERM or SIGINT, then stop cleanly (main thread only)."""
        received: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            received.append(signum)
            self._stopped.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stopped.wait(0.5):
                pass
            if received:
                log.info("received %s, shutting down", signal.Signals(received[0]).name)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
