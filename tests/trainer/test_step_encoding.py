"""The trainer's STEP encoding: STEP_PACKED by default, JSON on request, as the frames on a real socket show."""

from __future__ import annotations

import socket
import tempfile
import threading
import time

import pytest
import torch

import adamwatch
from adamwatch import wire
from adamwatch.monitor import STEP_ENCODING_ENV, MonitorConfig

from .test_monitor import batch, make_model, make_optimizer


class FrameRecorder:
    """A bare Unix-socket listener that records every frame a trainer sends (no sidecar logic)."""

    def __init__(self) -> None:
        self.path = tempfile.mktemp(prefix="aw-enc-", suffix=".sock", dir="/tmp")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        self.messages: list[wire.Message] = []
        self.raw_types: list[int] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"unix://{self.path}"

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        decoder = wire.FrameDecoder()
        buffered = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buffered += data
                while len(buffered) >= wire.HEADER.size:  # the raw type codes, before decoding
                    _, _, code, length = wire.HEADER.unpack_from(buffered)
                    if len(buffered) < wire.HEADER.size + length:
                        break
                    self.raw_types.append(code)
                    buffered = buffered[wire.HEADER.size + length:]
                self.messages.extend(m for m in decoder.feed(data) if isinstance(m, wire.Message))

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("encoding", ["packed", "json", None])
def test_the_monitor_sends_steps_in_the_chosen_encoding(monkeypatch, encoding) -> None:
    monkeypatch.delenv(STEP_ENCODING_ENV, raising=False)
    recorder = FrameRecorder()
    model = make_model()
    opt = make_optimizer(model)
    options = {} if encoding is None else {"step_encoding": encoding}
    with adamwatch.watch(opt, endpoint=recorder.endpoint, job="enc", rank=0, policy_wait=0, **options) as monitor:
        for i in range(3):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    deadline = time.monotonic() + 10
    while sum(m.type is wire.MessageType.STEP for m in recorder.messages) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    recorder.close()
    expected = wire.MessageType.STEP if encoding == "json" else wire.MessageType.STEP_PACKED
    hello = recorder.messages[0]
    assert hello.type is wire.MessageType.HELLO and hello.payload["step_encoding"] == (encoding or "packed")
    step_codes = [c for c in recorder.raw_types if c in (wire.MessageType.STEP, wire.MessageType.STEP_PACKED)]
    assert step_codes == [int(expected)] * 3
    steps = [m.payload for m in recorder.messages if m.type is wire.MessageType.STEP]
    assert [p["step"] for p in steps] == [1, 2, 3]  # both decode to the same STEP payloads
    assert all(isinstance(p["loss"], float) and len(p["lr"]) == 2 for p in steps)


def test_the_environment_picks_the_encoding_and_a_bad_one_is_named(monkeypatch) -> None:
    monkeypatch.setenv(STEP_ENCODING_ENV, "json")
    assert MonitorConfig().resolved_step_encoding() == "json"
    assert MonitorConfig(step_encoding="packed").resolved_step_encoding() == "packed"  # the field wins
    monkeypatch.setenv(STEP_ENCODING_ENV, "msgpack")
    with pytest.raises(ValueError, match="step_encoding .*ADAMWATCH_STEP_ENCODING.* 'msgpack'"):
        MonitorConfig().validate()
