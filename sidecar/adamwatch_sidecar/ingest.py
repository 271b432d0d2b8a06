"""Receive trainer frames over a Unix socket or loopback TCP and apply them to the run state.

One asyncio event loop serves every trainer connection. Each connection owns a
``wire.FrameDecoder`` fed from ``data_received``; HELLO must be the connection's
first accepted message. Every rejected frame is counted in
``adamwatch_frames_rejected_total{reason}`` and logged with the peer (rate-limited,
so a peer sending garbage cannot flood the log). Fatal rejections (bad_magic,
oversized, truncated) close that connection only.

Before a connection's messages reach the run state it passes
:class:`~adamwatch_sidecar.admission.Admission` (peer credentials, the shared
secret, one live connection per (job, rank), world size, caps). Memory is
bounded: a frame is at most ``max_frame_bytes``, partial frames of all
connections together at most ``max_buffered_bytes``, and a partial frame that
is not completed within ``partial_frame_timeout`` closes its connection.
Refusals are counted in ``adamwatch_sidecar_connections_refused_total{reason}``.

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

from .admission import REFUSAL_REASONS, Admission, Refused, peer_credentials
from .run_state import RunState, TrainerKey, as_key

__all__ = ["IngestServer", "RateLimitedLog", "short"]

log = logging.getLogger(__name__)

# Many ranks reconnect at once after a sidecar restart; a short accept queue
# would refuse them (EAGAIN on Unix sockets) while the loop catches up.
_BACKLOG = 1024


def short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: peer-supplied text never floods the log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"...({len(text)} chars)"


class RateLimitedLog:
    """Log at most ``burst`` lines per ``interval`` seconds; count what was suppressed.

    Args:
        logger: where lines go.
        burst: lines allowed per interval.
        interval: seconds.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(self, logger: logging.Logger, burst: int = 20, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING):
        self._logger = logger
        self._level = level
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
        self._logger.log(self._level, msg, *args)
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
        self.buffered = 0  # bytes of a partial frame, as counted in the server's total
        self.partial_since: float | None = None  # monotonic time the pending partial frame began
        self.admitted_job: str | None = None  # job counted in Admission.joined

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        creds = None
        if not peer:  # Unix sockets: say which connection and, where we can, which process
            creds = peer_credentials(transport.get_extra_info("socket"))
            peer = f"unix#{self.conn_id}" + (f"(pid {creds.pid} uid {creds.uid})" if creds else "")
        elif isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}#{self.conn_id}"
        self.peer = str(peer)
        self.server._connection_opened(self)
        try:
            self.server.admission.check_peer(creds)
        except Refused as refused:
            self.server._refuse(self, refused)
            return
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
        if self.closed or self.transport is None or self.transport.is_closing():
            return  # refused or closing: what it still sends is not looked at
        completed = False
        try:
            for item in self.decoder.feed(data):
                completed = True
                if isinstance(item, wire.FrameError):
                    server._reject(self, item)
                    if item.fatal:
                        self.close()
                        return
                    continue
                server._accept(self, item)
                if self.closed or self.transport.is_closing():
                    return
        except Exception:
            # A bug in our own handling must cost this connection, never the process.
            log.exception("ingest: unexpected error on connection %s; closing it", self.peer)
            self.close()
            return
        server._track_buffer(self, completed)

    def eof_received(self) -> bool:
        error = self.decoder.finish()
        if error is not None:
            self.server._reject(self, error)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._release_buffer(self)
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
            self.server._release_buffer(self)


class IngestServer:
    """Serves trainer connections on one endpoint and feeds a :class:`RunState`.

    Args:
        state: the run state to update (and to count rejections in).
        listen: ``unix:///path`` or ``tcp://HOST:PORT`` (port 0 picks one; see :attr:`endpoint`).
        max_frame_bytes: largest frame payload accepted.
        hello_timeout: seconds a new connection has to send its HELLO before it
            is closed (0 disables).
        admission: the checks of peers and HELLOs (defaults: none but one live
            connection per (job, rank), world size and the default caps).
        socket_mode: permission bits of the Unix socket (its folder gets search bits too).
        socket_group: group name or gid for the Unix socket and its folder.
        max_buffered_bytes: partial-frame bytes over all connections.
        partial_frame_timeout: seconds a partial frame may stay incomplete.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(self, state: RunState, listen: str, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
                 hello_timeout: float = 60.0, *, admission: Admission | None = None, socket_mode: int = 0o660,
                 socket_group: str | None = None, max_buffered_bytes: int = 32 << 20,
                 partial_frame_timeout: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.admission = admission if admission is not None else Admission()
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_buffered_bytes = max_buffered_bytes
        self.partial_frame_timeout = partial_frame_timeout
        self._monotonic = clock
        self.buffered_bytes = 0  # partial frames of every connection
        self._stall_check: asyncio.TimerHandle | None = None
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
        self._hello_log = RateLimitedLog(log, burst=50, level=logging.INFO)
        for reason in wire.REJECT_REASONS:  # export every reason from the start, at 0
            state.inc_global("adamwatch_frames_rejected_total", {"reason": reason}, 0)
        state.inc_global("adamwatch_frame_unknown_fields_total", {}, 0)
        state.set_global_gauge("adamwatch_sidecar_connections", {}, 0)
        state.inc_global("adamwatch_sidecar_render_errors_total", {}, 0)
        for reason in REFUSAL_REASONS:
            state.inc_global("adamwatch_sidecar_connections_refused_total", {"reason": reason}, 0)

    # ------------------------------------------------------------------ lifecycle (loop thread)
    async def start(self) -> None:
        """Bind the endpoint and start accepting (call on the event loop).

        Raises:
            OSError: the endpoint cannot be bound, or a live sidecar already owns the socket.
        """
        self._loop = asyncio.get_running_loop()
        ep = self.requested
        if ep.scheme == "unix":
            gid = _group_id(self.socket_group)
            _prepare_unix_path(ep.path, _folder_mode(self.socket_mode), gid)
            # Created with no access for anyone, then opened to owner and group:
            # no moment in which another user could connect.
            old_umask = os.umask(0o777)
            try:
                self._server = await self._loop.create_unix_server(self._protocol, path=ep.path, backlog=_BACKLOG)
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(ep.path, -1, gid)
            # The socket drives remediation: owner and the trainer's group only.
            os.chmod(ep.path, self.socket_mode)
            self.endpoint = ep
        else:
            if ep.host not in ("127.0.0.1", "localhost", "::1") and self.admission._secret is None:
                log.warning("ingest listens on %s without a shared secret: anyone who reaches it may "
                            "drive remediation; set secret_file", ep)
            self._server = await self._loop.create_server(self._protocol, host=ep.host, port=ep.port, backlog=_BACKLOG)
            host, port = self._server.sockets[0].getsockname()[:2]
            self.endpoint = wire.Endpoint("tcp", host=host, port=port)
        self.listening = True
        self._stall_check = self._loop.call_later(1.0, self._check_stalled)
        log.info("ingest listening on %s", self.endpoint)

    async def stop(self) -> None:
        """Stop accepting, close every connection, remove the socket file (call on the loop)."""
        self.listening = False
        if self._stall_check is not None:
            self._stall_check.cancel()
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
        if conn.admitted_job is not None:
            self.admission.left(conn.admitted_job)
            conn.admitted_job = None
        key = conn.key
        if key is not None:
            with self._by_key_lock:
                if self._by_key.get(key) is conn:
                    del self._by_key[key]
            if self.state.disconnect(key, conn.conn_id):
                log.info("trainer job=%s rank=%s disconnected (%s)", short(key.job), key.rank, conn.peer)

    # ------------------------------------------------------------------ bounds
    def _refuse(self, conn: _Connection, refused: Refused) -> None:
        """Count a refusal by reason, log it (rate-limited) and close that connection."""
        self.state.inc_global("adamwatch_sidecar_connections_refused_total", {"reason": refused.reason})
        self._reject_log.warning("ingest: refused %s: %s", conn.peer, short(str(refused), 200))
        conn.close()

    def _track_buffer(self, conn: _Connection, completed: bool) -> None:
        now_buffered = conn.decoder.buffered
        self.buffered_bytes += now_buffered - conn.buffered
        conn.buffered = now_buffered
        if not now_buffered:
            conn.partial_since = None
            return
        if completed or conn.partial_since is None:
            conn.partial_since = self._monotonic()
        if self.buffered_bytes > self.max_buffered_bytes:
            self._refuse(conn, Refused("buffer_limit", f"partial frames hold {self.buffered_bytes} bytes "
                                                       f"(max_buffered_bytes {self.max_buffered_bytes})"))

    def _release_buffer(self, conn: _Connection) -> None:
        self.buffered_bytes -= conn.buffered
        conn.buffered = 0
        conn.partial_since = None

    def _check_stalled(self) -> None:
        """Once a second: close connections whose partial frame stopped making progress."""
        limit = self._monotonic() - self.partial_frame_timeout
        for conn in list(self._connections.values()):
            if conn.partial_since is not None and conn.partial_since <= limit and not conn.closed:
                self._refuse(conn, Refused("stalled_frame", f"a partial frame of {conn.buffered} bytes was not "
                                                            f"completed within {self.partial_frame_timeout:g} s"))
        if self._loop is not None and self.listening:
            self._stall_check = self._loop.call_later(1.0, self._check_stalled)

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

        payload = message.payload
        try:
            self.admission.check_secret(payload)
            key = TrainerKey(payload["job"], payload["rank"])
            with self._by_key_lock:
                holder = self._by_key.get(key)
            # A live holder keeps its (job, rank): a second HELLO for it is an
            # impostor or a confused launcher, and must never reset the real
            # trainer's ladder. A restarted trainer's old connection is gone
            # (its process died with it), so the restart is admitted.
            held = holder is not None and not holder.closed
            self.admission.check_hello(payload, held=held, known=self.state.knows(key),
                                       trainers=self.state.trainer_count())
        except Refused as refused:
            self._refuse(conn, refused)
            return

        def register(key: TrainerKey) -> None:
            conn.key = key
            with self._by_key_lock:
                self._by_key[key] = conn
            self.admission.joined(key.job, payload["world_size"])
            conn.admitted_job = key.job
            self._hello_log.warning("trainer job=%s rank=%s said hello from %s (session %s)", short(key.job),
                                    key.rank, conn.peer, short(payload["session"]))

        self.state.hello(conn.conn_id, payload, on_registered=register)

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


def _folder_mode(socket_mode: int) -> int:
    """The socket's folder: the socket's bits plus search wherever reading is allowed."""
    return socket_mode | 0o700 | ((socket_mode & 0o040) >> 2)


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OSError(f"socket_group {group!r}: no such group") from None


def _prepare_unix_path(path: str, folder_mode: int = 0o770, gid: int | None = None) -> None:
    """Create the parent folder (not world-accessible); remove a stale socket; refuse a live one or a non-socket."""
    parent = os.path.dirname(path)
    if parent:
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=folder_mode, exist_ok=True)
        info = os.stat(parent)
        if info.st_uid == os.getuid():
            if gid is not None and info.st_gid != gid:
                os.chown(parent, -1, gid)
            os.chmod(parent, folder_mode)
        elif info.st_mode & 0o002 and not info.st_mode & 0o1000:
            log.warning("the socket folder %s is world-writable and not ours: another user could replace "
                        "the socket; mount it with a group and mode 0770 (the chart does)", parent)
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
