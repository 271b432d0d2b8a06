"""Fixtures for trainer-side tests: a real socket that records what a Monitor sends."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from adamwatch import wire


class FrameSink:
    """A minimal sidecar stand-in: a real Unix socket server that decodes and keeps every message."""

    def __init__(self, path: str):
        self.path = path
        self.endpoint = f"unix://{path}"
        self.messages: list[wire.Message] = []
        self.errors: list[wire.FrameError] = []
        self.connections: list[socket.socket] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        decoder = wire.FrameDecoder()
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            for item in decoder.feed(data):
                (self.errors if isinstance(item, wire.FrameError) else self.messages).append(item)

    def send_command(self, payload: dict, index: int = -1) -> None:
        self.connections[index].sendall(wire.encode_frame(wire.MessageType.COMMAND, payload, validate=True))

    def of_type(self, msg_type: wire.MessageType) -> list[dict]:
        return [m.payload for m in list(self.messages) if m.type == msg_type]

    def steps(self) -> list[dict]:
        return self.of_type(wire.MessageType.STEP)

    def wait_for(self, predicate, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout}s; got {len(self.messages)} messages")

    def close(self) -> None:
        self._stop.set()
        for conn in self.connections:
            conn.close()
        self._server.close()
        self._thread.join(1)


@pytest.fixture
def short_dir():
    """A short temporary folder: Unix socket paths are limited to ~107 bytes."""
    path = tempfile.mkdtemp(prefix="aw-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sink(short_dir):
    s = FrameSink(os.path.join(short_dir, "aw.sock"))
    yield s
    s.close()
