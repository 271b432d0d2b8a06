"""The trainer's connection to its sidecar: a background thread, a bounded queue, reconnects.

The training loop only ever calls ``send`` / ``send_control``, which append to
in-memory queues and return. The thread connects (with backoff), says HELLO on
every (re)connection, writes frames with non-blocking sends, and reads COMMAND
frames coming back. When the sidecar is missing, dead or slow, the oldest
summaries are dropped and counted; the count reaches the sidecar in the next
HELLO and in DROPPED messages, so the gap is visible in
``adamwatch_dropped_summaries_total``.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable

from adamwatch import wire

__all__ = ["StreamClient"]

log = logging.getLogger("adamwatch.client")

_SEND_CHUNK = 256 * 1024
# The longest the thread sleeps when nothing is due: a safety net only; every
# source of work wakes it (a summary, a control frame, the socket, a deadline).
_IDLE_SLEEP = 30.0
# Control frames (ACK, CHECKPOINT, GOODBYE, ...) kept while they wait to be sent.
MAX_CONTROL_FRAMES = 1024


class Wakeup:
    """Wakes the client thread from any thread: a pipe it selects on together with its socket.

    Only a thread that sleeps on the pipe needs a byte written into it. While
    the client batches it pauses and looks for work afterwards, so ``set``
    then only raises a flag: no system call on the step path, and none to
    drain the pipe on the client's next turn (on a 2-core VM each costs
    70-150 us of CPU). The client ``arm``s the pipe before its idle sleep and
    ``disarm``s it after; ``set`` writes one byte while armed. ``urgent``
    writes whether armed or not: the pause watches the pipe for it. Whoever
    sleeps and finds the pipe readable drains it (``_written`` is only a hint).

    Order matters, and the GIL makes the two threads' flag operations
    sequentially consistent: ``set`` raises ``pending`` and then reads
    ``armed``; ``arm`` raises ``armed`` and then reads ``pending``. Either the
    sleeper sees the work and does not sleep, or the setter sees the sleeper
    and writes; never neither. The thread calls ``clear`` *before* it looks for
    work, so a ``set`` that lands after ``clear`` is seen by the next ``arm``.
    """

    def __init__(self) -> None:
        self._read, self._write_fd = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write_fd, False)
        self._pending = False
        self._armed = False
        self._written = False  # a byte may be in the pipe
        self._closed = False
        self.wakeups = 0  # times a set() actually wrote (for tests and benchmarks)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        if self._pending or self._closed:
            return
        self._pending = True
        if not self._armed:
            return  # the client will look at the flag before it sleeps on the pipe
        self._write()

    def urgent(self) -> None:
        """Wake the thread even from its pause (the pause watches the pipe too):
        work that must not wait for the pause to end, such as summaries about
        to overflow the transfer's bound."""
        if self._closed:
            return
        self._pending = True
        # Always a byte (rare: once per crossing of the bound): _written may be
        # left up by a set() whose byte was drained before its flag went up.
        self._write()

    def _write(self) -> None:
        self.wakeups += 1
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe already holds bytes (or is closed): the thread wakes anyway
        # _written is a hint, not the truth, in both directions: a clear() between
        # the write and this line skips the read (the sleep that finds the byte
        # drains it), and a drain between them leaves the flag up over an empty
        # pipe (the next clear() reads nothing). Sleeps drain whatever they see.
        self._written = True

    def clear(self) -> None:
        self._pending = False
        if self._written:
            self.drain()
        # else nothing was written since the last clear (no system call), or a
        # write is under way whose flag is not up yet: the sleep that sees its
        # byte drains it (drain below).

    def drain(self) -> None:
        """Empty the pipe: the thread found it readable."""
        if self._closed:
            return
        self._written = False  # before the read: a byte written after it is read next time
        try:
            os.read(self._read, 4096)
        except (BlockingIOError, OSError):
            pass

    def arm(self) -> bool:
        """Before a sleep that watches the pipe. Returns False (and stays disarmed)
        when work is already pending: do not sleep."""
        self._armed = True
        if self._pending:
            self._armed = False
            return False
        return True

    def disarm(self) -> None:
        self._armed = False

    @property
    def pending(self) -> bool:
        return self._pending

    def close(self) -> None:
        # A closed pipe's descriptors may be reused by other files: from now on
        # set() must never write, and clear() never read.
        self._closed = True
        self._pending = True
        self._written = False
        for fd in (self._read, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class StreamClient:
    """Streams frames to the sidecar from a background thread.

    Args:
        endpoint: ``unix:///path`` or ``tcp://127.0.0.1:PORT``.
        hello: returns the HELLO payload (called on every connection; the
            client fills in ``dropped_total``).
        on_command: called on the client thread with each COMMAND payload.
        poll: called on the client thread every loop turn (never blocks);
            returns frames (already encoded) to send. The monitor uses it to
            turn finished summary vectors into STEP frames off the step path.
            Whoever produces work for it calls :meth:`wake`.
        next_due: returns the monotonic time at which ``poll`` has something
            due without being woken (e.g. a periodic report), or None.
        max_queued: summaries kept while disconnected; older ones are dropped.
        backoff: (first, max) seconds between connection attempts.
        wait: how long the thread pauses after an unexpected error in its loop.
        batch_interval: returns how long to pause between turns (0: send each
            summary as soon as it is ready).
        secret_file: file holding the sidecar's shared secret, sent in every
            HELLO (re-read on each connection, so a rotated Secret is picked
            up); default ``$ADAMWATCH_SECRET_FILE``, none when unset.
    """

    def __init__(
        self,
        endpoint: str,
        hello: Callable[[], dict[str, Any]],
        *,
        on_command: Callable[[dict[str, Any]], None] | None = None,
        poll: Callable[[], list[bytes]] | None = None,
        next_due: Callable[[], float | None] | None = None,
        max_queued: int = 4096,
        backoff: tuple[float, float] = (0.05, 1.0),
        wait: float = 0.05,
        batch_interval: Callable[[], float] | None = None,
        secret_file: str | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self.endpoint = wire.parse_endpoint(endpoint)
        self._secret_file = secret_file if secret_file is not None else os.environ.get(wire.SECRET_FILE_ENV)
        # Failures of this thread are counted by the owner (sent as MONITOR_ERRORS), not only logged.
        self._on_error = on_error
        self._hello = hello
        self._on_command = on_command
        self._poll = poll
        self._next_due = next_due
        self._wakeup = Wakeup()
        # Turns of the thread's loop: with nothing to send it sleeps, so this
        # stays flat on an idle trainer (tests count it).
        self.turns = 0
        self.control_dropped = 0
        self._wait = wait
        self._batch_interval = batch_interval
        self._backoff = backoff
        self._queue: collections.deque[bytes] = collections.deque()
        self._max_queued = max_queued
        # Control frames (ACK, CHECKPOINT, GOODBYE) are few and must not be
        # pushed out by a flood of summaries.
        # Bounded: beyond it a frame is refused and counted (control_dropped,
        # reported through on_error), never silently pushed out.
        self._control: collections.deque[bytes] = collections.deque()
        # The GOODBYE, held back until every summary before it has gone out:
        # the sidecar judges the run's end (target reached, convergence) when
        # it reads it, so it must be the connection's last frame.
        self._farewell: bytes | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._partial = b""
        self._decoder = wire.FrameDecoder()
        self._next_attempt = 0.0
        self._delay = backoff[0]
        self._announced_missing = False
        self._stop = threading.Event()
        self._drain = threading.Event()
        self.dropped_total = 0
        self._dropped_reported = 0
        self.connected = False
        self.connections = 0
        self.frames_sent = 0
        self._thread = threading.Thread(target=self._run, name="adamwatch-client", daemon=True)

    # ------------------------------------------------------------ trainer side
    def start(self) -> None:
        """Try to connect once right away (setup, not the step path), then run the thread."""
        try:
            self._maybe_connect()
        except Exception:
            log.exception("adamwatch: first connection attempt failed")
        self._thread.start()

    def send(self, frame: bytes) -> None:
        """Queue a summary frame; drops the oldest when full. Never blocks on the network.

        After the connection is lost, summaries are dropped (and counted) at
        once rather than replayed later: the sidecar exports the present, and
        replaying stale steps would feed old incidents to its detectors. Before
        the first connection they wait in the queue, so a sidecar that starts a
        moment after the trainer still sees the first steps.
        """
        with self._lock:
            if not self.connected and self.connections:
                self.dropped_total += 1
                return
            if len(self._queue) >= self._max_queued:
                self._queue.popleft()
                self.dropped_total += 1
            self._queue.append(frame)
        if threading.get_ident() != self._thread.ident:
            # From another thread (not the thread's own poll): it may be asleep.
            self._wakeup.set()

    def send_control(self, frame: bytes) -> None:
        """Queue a control frame (sent before pending summaries) and wake the thread.

        At most ``MAX_CONTROL_FRAMES`` wait; a frame beyond them is dropped and
        counted (``control_dropped``, and ``on_error("control_queue_full")``).
        """
        with self._lock:
            full = len(self._control) >= MAX_CONTROL_FRAMES
            if full:
                self.control_dropped += 1
            else:
                self._control.append(frame)
        if full and self._on_error is not None:
            self._on_error("control_queue_full")
        self._wakeup.set()

    def wake(self) -> None:
        """New work for ``poll`` (a summary, an evaluation): the thread runs a turn soon."""
        self._wakeup.set()

    def hurry(self) -> None:
        """Work that must not wait for the end of the pause: a turn now."""
        self._wakeup.urgent()

    def count_dropped(self, n: int) -> None:
        """Summaries lost before they reached the client (e.g. the transfer pool was full)."""
        with self._lock:
            self.dropped_total += n

    def close(self, timeout: float = 2.0, goodbye: dict[str, Any] | None = None) -> None:
        """Flush what is queued (up to ``timeout``), say GOODBYE last, stop the thread."""
        if goodbye is not None:
            with self._lock:
                self._farewell = wire.encode_frame(wire.MessageType.GOODBYE, goodbye)
        self._drain.set()
        self._wakeup.set()
        self._thread.join(timeout) if self._thread.is_alive() else None
        self._stop.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        self._disconnect(quiet=True)
        with self._lock:
            # Whatever could not be delivered by now never will be.
            self.dropped_total += len(self._queue)
            self._queue.clear()
        if not self._thread.is_alive():
            self._wakeup.close()

    # ------------------------------------------------------------ client thread
    def _run(self) -> None:
        commands_waiting = True  # the first turn looks at the socket
        while not self._stop.is_set():
            try:
                self.turns += 1
                # Read before polling: once close() has been called, this turn's
                # poll sees every summary submitted before it.
                draining = self._drain.is_set()
                if self._sock is None:
                    self._maybe_connect()
                self._wakeup.clear()  # before looking for work (see Wakeup)
                frames = self._poll() if self._poll else ()
                for frame in frames or ():
                    self.send(frame)
                if self._sock is not None:
                    # The GOODBYE only on a draining turn: its poll has seen
                    # every summary submitted before close().
                    self._flush(final=draining)
                    if commands_waiting or draining:
                        self._read_commands()
                if draining and self._all_sent():
                    return
                if draining and self._sock is None and time.monotonic() < self._next_attempt:
                    # Shutting down with no sidecar: nothing more can be sent.
                    return
                commands_waiting = True
                if not draining and not self._stop.is_set():
                    interval = self._batch_interval() if self._batch_interval else 0.0
                    commands_waiting = self._sleep(interval)
            except Exception:  # the client must never die: log and carry on
                if self._on_error is not None:
                    self._on_error("client_loop")
                else:
                    log.exception("adamwatch: client loop error (continuing)")
                self._disconnect(quiet=True)
                time.sleep(self._wait)

    def _sleep(self, pace: float) -> bool:
        """Sleep until there is something to do: a wake-up, the socket, or a deadline.

        No timer ticks while idle: an idle trainer's client thread never takes
        the GIL from the training thread. With ``pace`` > 0 the thread first
        waits that long for the socket (a COMMAND still wakes it at once) and
        for an urgent wake-up only, so the steps finished meanwhile go out in
        one send: every wake-up and
        every system call hands the GIL back and forth with the training
        thread, so fewer of them cost the trainer less. Returns whether the
        socket may hold a COMMAND (so a turn without one makes no ``recv``).
        """
        sock = self._sock
        if pace > 0:
            # The pipe is watched but not armed: only urgent() writes into it now.
            watched: list[Any] = [self._wakeup] if sock is None else [sock, self._wakeup]
            readable, _, _ = select.select(watched, [], [], pace)
            if self._wakeup in readable:
                self._wakeup.drain()  # an urgent wake-up, or a byte whose flag was not up yet at the last clear
            if sock is not None and sock in readable:
                return True
            if self._wakeup.pending or self._drain.is_set():
                return False  # work arrived while pacing: a turn now, the socket was quiet
        now = time.monotonic()
        deadline = now + _IDLE_SLEEP
        sock = self._sock
        if sock is None:
            deadline = min(deadline, self._next_attempt)
        elif self._next_due is not None:
            due = self._next_due()
            if due is not None:
                deadline = min(deadline, due)
        readable: list[Any] = [self._wakeup]
        writable: list[Any] = []
        if sock is not None:
            readable.append(sock)  # a COMMAND, or the sidecar closing
            if self._partial:
                writable.append(sock)  # a slow sidecar: resume when its buffer drains
        timeout = max(0.0, deadline - now)
        if not timeout:
            return True
        if not self._wakeup.arm():
            return False  # work arrived since this turn looked: a turn now
        try:
            ready, _, _ = select.select(readable, writable, [], timeout)
        finally:
            self._wakeup.disarm()
        if self._wakeup in ready:
            self._wakeup.drain()  # whatever the flags say: a byte left in the pipe would end every sleep at once
        return sock is not None and sock in ready

    def _all_sent(self) -> bool:
        with self._lock:
            return not self._queue and not self._control and not self._partial and self._farewell is None

    def _maybe_connect(self) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            return
        ep = self.endpoint
        try:
            if ep.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(1.0)
                sock.connect(ep.path)
            else:
                sock = socket.create_connection((ep.host, ep.port), timeout=1.0)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            self._next_attempt = now + self._delay
            self._delay = min(self._delay * 2, self._backoff[1])
            if not self._announced_missing:
                self._announced_missing = True
                log.warning(
                    "adamwatch: no sidecar at %s (%s); training continues, summaries are dropped and "
                    "counted until it is reachable (logged once)", ep, exc.strerror or exc,
                )
            return
        sock.setblocking(False)
        self._sock = sock
        self._decoder = wire.FrameDecoder()
        self._delay = self._backoff[0]
        self.connected = True
        self.connections += 1
        with self._lock:
            hello = dict(self._hello())
            hello["dropped_total"] = self.dropped_total
            secret = self._read_secret()
            if secret is not None:
                hello["secret"] = secret
            self._dropped_reported = self.dropped_total
            # HELLO must be the first frame of the connection.
            self._partial = wire.encode_frame(wire.MessageType.HELLO, hello)
        if self._announced_missing or self.connections > 1:
            log.info("adamwatch: connected to sidecar at %s", ep)
        self._announced_missing = False

    def _read_secret(self) -> str | None:
        if not self._secret_file:
            return None
        try:
            with open(self._secret_file, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError as exc:
            log.warning("adamwatch: cannot read the sidecar secret %s (%s); saying HELLO without it",
                        self._secret_file, exc.strerror or exc)
            return None

    def _disconnect(self, quiet: bool = False) -> None:
        sock, self._sock = self._sock, None
        self.connected = False
        if sock is None:
            return
        try:
            sock.close()
        except OSError:
            pass
        with self._lock:
            if self._partial:
                # The frame cut off mid-write is lost; a new connection starts clean.
                self.dropped_total += 1
                self._partial = b""
            self.dropped_total += len(self._queue)
            self._queue.clear()
        self._next_attempt = time.monotonic() + self._delay
        if not quiet:
            log.warning("adamwatch: lost the sidecar at %s; reconnecting, summaries are counted as dropped", self.endpoint)

    def _next_chunk(self, final: bool = False) -> bytes:
        with self._lock:
            if self._partial:
                chunk, self._partial = self._partial, b""
                return chunk
            if self.dropped_total > self._dropped_reported:
                self._dropped_reported = self.dropped_total
                self._control.appendleft(
                    wire.encode_frame(wire.MessageType.DROPPED, {"dropped_total": self.dropped_total})
                )
            parts: list[bytes] = []
            size = 0
            while self._control and size < _SEND_CHUNK:
                frame = self._control.popleft()
                parts.append(frame)
                size += len(frame)
            while self._queue and size < _SEND_CHUNK:
                frame = self._queue.popleft()
                parts.append(frame)
                size += len(frame)
            if final and self._farewell is not None and not self._queue and not self._control:
                parts.append(self._farewell)
                self._farewell = None
            self.frames_sent += len(parts)
            return b"".join(parts)

    def _flush(self, final: bool = False) -> None:
        sock = self._sock
        while sock is not None:
            chunk = self._next_chunk(final)
            if not chunk:
                return
            try:
                sent = sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:
                with self._lock:
                    self._partial = chunk
                self._disconnect()
                return
            if sent < len(chunk):
                with self._lock:
                    self._partial = chunk[sent:]
                return  # the socket buffer is full: the sidecar is slow; try next turn

    def _read_commands(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._disconnect()
            return
        if not data:
            self._disconnect()
            return
        for item in self._decoder.feed(data):
            if isinstance(item, wire.FrameError):
                log.warning("adamwatch: bad frame from sidecar (%s): %s", item.reason, item)
                if item.fatal:
                    self._disconnect()
                    return
                continue
            if item.type == wire.MessageType.COMMAND and self._on_command is not None:
                try:
                    self._on_command(item.payload)
                except Exception:
                    if self._on_error is not None:
                        self._on_error("command_handler")
                    else:
                        log.exception("adamwatch: command handler failed for %r", item.payload)


def default_job_name() -> str:
    """$ADAMWATCH_JOB, else the training script's name."""
    import sys

    job = os.environ.get("ADAMWATCH_JOB")
    if job:
        return job
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    stem = os.path.splitext(script)[0]
    return stem if stem and stem not in ("-c", "-m") else "trainer"
