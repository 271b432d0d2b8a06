"""The Monitor's side: the verdict wait is bounded, CONFIG frames follow the schema, no sidecar means no wait."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

import adamwatch
from adamwatch import wire


def test_a_sidecar_that_never_answers_delays_the_start_by_policy_wait_only(tmp_path):
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    received = bytearray()

    def accept() -> None:  # an older sidecar: reads, never sends a verdict
        conn, _ = server.accept()
        conn.settimeout(5)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                received.extend(data)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=accept, daemon=True).start()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.monotonic()
    monitor = adamwatch.watch(optimizer, endpoint=f"unix://{path}", job="silent", policy_wait=0.4)
    waited = time.monotonic() - started
    try:
        assert 0.35 <= waited < 3.0
        assert monitor.policy_verdict is None and not monitor.stop_requested
    finally:
        monitor.close()
        server.close()
    hello = next(m for m in wire.FrameDecoder().feed(bytes(received)) if isinstance(m, wire.Message))
    assert hello.type is wire.MessageType.HELLO
    assert hello.payload["config_hash"] == monitor.config_hash
    assert hello.payload["config"]["param_groups"][0]["peak_lr"] == 1e-3
    assert hello.payload["features"] == {"checkpointer": False, "guard": False, "deep_stats": True}


def test_config_frames_round_trip_and_a_missing_field_is_a_schema_error():
    payload = {"step": 6, "time": 1.0, "config": {"param_groups": []}, "config_hash": "ab", "previous_hash": None,
               "changed": ["param_groups[0].eps: 1e-08 -> 1e-06"]}
    [message] = wire.FrameDecoder().feed(wire.encode_frame(wire.MessageType.CONFIG, payload))
    assert message.type is wire.MessageType.CONFIG and message.payload == payload
    del payload["changed"]
    [error] = wire.FrameDecoder().feed(wire.encode_frame(wire.MessageType.CONFIG, payload))
    assert isinstance(error, wire.SchemaError) and "CONFIG.changed is required" in str(error)


@pytest.mark.parametrize("bad", [{"policy_wait": -1}, {"policy_wait": True}, {"check_config_every": -2}])
def test_bad_options_name_the_field(bad):
    optimizer = torch.optim.Adam(torch.nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match=next(iter(bad))):
        adamwatch.watch(optimizer, endpoint=None, **bad)


def test_adamwatch_own_cut_is_not_reported_as_a_change_but_a_new_group_is():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    with adamwatch.watch(optimizer, scheduler=scheduler, endpoint=None, deep_stats_every=0) as monitor:
        def step() -> None:
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

        first = monitor.config_hash
        step()
        monitor.reduce_lr(0.5)
        step()
        step()
        assert monitor.config_changes == 0 and monitor.config_hash == first
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-4})
        step()
        assert monitor.config_changes == 1 and monitor.config_hash != first
        assert len(monitor.optimizer_config["param_groups"]) == 2
