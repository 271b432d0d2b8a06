"""Receive trainer frames over a Unix socket or loopback TCP and apply them to the run state.

One asyncio event loop serves every trainer connection. Each connection owns a
``wire.FrameDecoder`` fed from ``data_received``; HELLO must be the connection's
first accepted message. Every rejected frame is counted in
``adamwatch_frames_rejected_total{reason}`` and logged with the peer (rate-limited,
so a peer sending garbage cannot flood the log). Fatal rejections (bad_magic,
oversized, truncated) close that connection only.

:meth:`IngestServer.send_command` writes a COMMAND frame to a trainer and may be
called from any thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
import threading
import time
from typing import Any, Callable

from adamwatch import wire

from .run_state import RunState, TrainerKey, as_key

__all__ = ["IngestServer", "RateLimitedLog"]

log = logging.getLogger(__name__)

# Many ranks reconnect at once after a sidecar restart; a short accept queue
# would refuse them (EAGAIN on Unix sockets) while the loop catches up.
_BACKLOG = 1024


class RateLimitedLog:
    """Log at most ``burst`` lines per ``interval`` seconds; count what was suppressed.

    Args:
        logger: where lines go.
        burst: lines allowed per interval.
        interval: seconds.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(self, logger: logging.Logger, burst: int = 20, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = clock()
        self._in_window = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> bool:
        """Log a warning unless over the limit. Returns whether it was logged."""
        now = self._clock()
        if now - self._window_start >= self._interval:
            if self.suppressed:
                self._logger.warning("%d similar log lines suppressed in the last %.0f s", self.suppressed,
                                     now - self._window_start)
            self._window_start = now
            self._in_window = 0
            self.suppressed = 0
        if self._in_window >= self._burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        self._logger.warning(msg, *args)
        return True


class _Connection(asyncio.Protocol):
    """One trainer connection: decode frames, apply messages, track the trainer key."""

    def __init__(self, server: "IngestServer", conn_id: int):
        self.server = server
        self.conn_id = conn_id
        self.decoder = wire.FrameDecoder(server.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.key: TrainerKey | None = None
        self.peer = "?"
        self.closed = False
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if not peer:  # Unix sockets: say which connection and, where we can, which pid
            sock = transport.get_extra_info("socket")
            pid = None
            try:
                if sock is not None and hasattr(socket, "SO_PEERCRED"):
                    import struct

                    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    pid = struct.unpack("3i", creds)[0]
            except OSError:
                pass
            peer = f"unix#{self.conn_id}" + (f"(pid {pid})" if pid else "")
        elif isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}#{self.conn_id}"
        self.peer = str(peer)
        self.server._connection_opened(self)
        if self.server.hello_timeout:
            self._hello_timer = asyncio.get_running_loop().call_later(self.server.hello_timeout, self._hello_overdue)

    def _hello_overdue(self) -> None:
        # A connection that never identifies itself only holds resources.
        if self.key is None and not self.closed:
            self.server._reject_log.warning("ingest: %s sent no HELLO within %.0f s; closing it", self.peer,
                                            self.server.hello_timeout)
            self.close()

    def data_received(self, data: bytes) -> None:
        server = self.server
        try:
            for item in self.decoder.feed(data):
                if isinstance(item, wire.FrameError):
                    server._reject(self, item)
                    if item.fatal:
                        self.close()
                        return
                    continue
                server._accept(self, item)
        except Exception:
            # A bug in our own handling must cost this connection, never the process.
            log.exception("ingest: unexpected error on connection %s; closing it", self.peer)
            self.close()

    def eof_received(self) -> bool:
        error = self.decoder.finish()
        if error is not None:
            self.server._reject(self, error)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self.decoder.failed is None:
            error = self.decoder.finish()
            if error is not None:
                self.server._reject(self, error)
        self.server._connection_closed(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class IngestServer:
    """Serves trainer connections on one endpoint and feeds a :class:`RunState`.

    Args:
        state: the run state to update (and to count rejections in).
        listen: ``unix:///path`` or ``tcp://HOST:PORT`` (port 0 picks one; see :attr:`endpoint`).
        max_frame_bytes: largest frame payload accepted.
        hello_timeout: seconds a new connection has to send its HELLO before it
            is closed (0 disables).
    """

    def __init__(self, state: RunState, listen: str, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
                 hello_timeout: float = 60.0):
        self.state = state
        self.hello_timeout = hello_timeout
        self.requested = wire.parse_endpoint(listen)
        self.endpoint: wire.Endpoint | None = None
        self.max_frame_bytes = max_frame_bytes
        self.listening = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ids = itertools.count(1)
        self._connections: dict[int, _Connection] = {}
        # trainer key -> its current connection; read by send_command from other threads
        self._by_key: dict[TrainerKey, _Connection] = {}
        self._by_key_lock = threading.Lock()
        self._reject_log = RateLimitedLog(log)
        for reason in wire.REJECT_REASONS:  # export every reason from the start, at 0
            state.inc_global("adamwatch_frames_rejected_total", {"reason": reason}, 0)
        state.inc_global("adamwatch_frame_unknown_fields_total", {}, 0)
        state.set_global_gauge("adamwatch_sidecar_connections", {}, 0)

    # ------------------------------------------------------------------ lifecycle (loop thread)
    async def start(self) -> None:
        """Bind the endpoint and start accepting (call on the event loop).

        Raises:
            OSError: the endpoint cannot be bound, or a live sidecar already owns the socket.
        """
        self._loop = asyncio.get_running_loop()
        ep = self.requested
        if ep.scheme == "unix":
            _prepare_unix_path(ep.path)
            self._server = await self._loop.create_unix_server(self._protocol, path=ep.path, backlog=_BACKLOG)
            # The trainer usually runs under another uid than the sidecar's
            # non-root user; the socket's folder (the pod's shared emptyDir) is
            # the access boundary, so the socket itself is open to all.
            os.chmod(ep.path, 0o666)
            self.endpoint = ep
        else:
            if ep.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("ingest listens on %s: trainer frames are unauthenticated, prefer loopback", ep)
            self._server = await self._loop.create_server(self._protocol, host=ep.host, port=ep.port, backlog=_BACKLOG)
            host, port = self._server.sockets[0].getsockname()[:2]
            self.endpoint = wire.Endpoint("tcp", host=host, port=port)
        self.listening = True
        log.info("ingest listening on %s", self.endpoint)

    async def stop(self) -> None:
        """Stop accepting, close every connection, remove the socket file (call on the loop)."""
        self.listening = False
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            conn.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)
            except asyncio.TimeoutError:
                pass
            self._server = None
        if self.endpoint is not None and self.endpoint.scheme == "unix":
            try:
                os.unlink(self.endpoint.path)
            except FileNotFoundError:
                pass

    def _protocol(self) -> _Connection:
        return _Connection(self, next(self._ids))

    # ------------------------------------------------------------------ connection events
    def _connection_opened(self, conn: _Connection) -> None:
        self._connections[conn.conn_id] = conn
        self.state.set_global_gauge("adamwatch_sidecar_connections", {}, len(self._connections))
        log.debug("ingest: connection %s opened", conn.peer)

    def _connection_closed(self, conn: _Connection) -> None:
        self._connections.pop(conn.conn_id, None)
        self.state.set_global_gauge("adamwatch_sidecar_connections", {}, len(self._connections))
        key = conn.key
        if key is not None:
            with self._by_key_lock:
                if self._by_key.get(key) is conn:
                    del self._by_key[key]
            if self.state.disconnect(key, conn.conn_id):
                log.info("trainer job=%s rank=%s disconnected (%s)", key.job, key.rank, conn.peer)

    def _reject(self, conn: _Connection, error: wire.FrameError) -> None:
        reason = error.reason if error.reason in wire.REJECT_REASONS else "malformed"
        self.state.inc_global("adamwatch_frames_rejected_total", {"reason": reason})
        self._reject_log.warning("ingest: rejected frame from %s: %s: %s%s", conn.peer, reason, error,
                                 " (closing the connection)" if error.fatal else "")

    def _accept(self, conn: _Connection, message: wire.Message) -> None:
        if message.unknown_fields:
            self.state.inc_global("adamwatch_frame_unknown_fields_total", {})
        mtype = message.type
        key = conn.key
        try:
            if mtype is wire.MessageType.HELLO:
                self._hello(conn, message)
            elif key is not None:  # the hot path: STEP after HELLO
                self.state.apply(key, message)
            else:
                raise wire.FrameError("unexpected", f"{mtype.name} before HELLO")
        except wire.FrameError as error:
            self._reject(conn, error)

    def _hello(self, conn: _Connection, message: wire.Message) -> None:
        if conn.key is not None:
            raise wire.FrameError("unexpected", "a second HELLO on the same connection")

        def register(key: TrainerKey) -> None:
            conn.key = key
            with self._by_key_lock:
                previous = self._by_key.get(key)
                self._by_key[key] = conn
            if previous is not None and previous is not conn:
                # The same trainer connected again (restart, or a half-open old
                # connection): the new one wins, counters are kept.
                log.warning("trainer job=%s rank=%s reconnected from %s; closing its old connection %s",
                            key.job, key.rank, conn.peer, previous.peer)
                previous.key = None
                previous.close()
            log.info("trainer job=%s rank=%s said hello from %s (session %s)", key.job, key.rank,
                     conn.peer, message.payload["session"])

        self.state.hello(conn.conn_id, message.payload, on_registered=register)

    # ------------------------------------------------------------------ commands
    def connected_keys(self) -> list[TrainerKey]:
        """Trainers with an open connection now (any thread)."""
        with self._by_key_lock:
            return list(self._by_key)

    def send_command(self, key: TrainerKey, payload: dict[str, Any]) -> bool:
        """Send a COMMAND to trainer ``key``; safe to call from any thread.

        Args:
            key: the trainer (job, rank).
            payload: a COMMAND payload (``id``, ``action``, optional ``args``, ...).

        Returns:
            True when the frame was handed to the trainer's open connection,
            False when the trainer is not connected.

        Raises:
            wire.SchemaError: (a ValueError) the payload violates the COMMAND schema.
        """
        frame = wire.encode_frame(wire.MessageType.COMMAND, payload, validate=True)
        key = as_key(key)
        with self._by_key_lock:
            conn = self._by_key.get(key)
        loop = self._loop
        if conn is None or conn.closed or conn.transport is None or loop is None or loop.is_closed():
            return False
        transport = conn.transport

        def write() -> None:
            if not transport.is_closing():
                transport.write(frame)

        if _running_loop() is loop:
            write()
        else:
            try:
                loop.call_soon_threadsafe(write)
            except RuntimeError:  # loop closed meanwhile
                return False
        return True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _prepare_unix_path(path: str) -> None:
    """Create the parent folder; remove a stale socket file; refuse a live one or a non-socket."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"ingest socket path {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover from a crashed sidecar
        log.info("removed stale socket file %s", path)
        return
    finally:
        probe.close()
    raise OSError(f"ingest socket {path} is in use by a running process")
