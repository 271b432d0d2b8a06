"""Memory with the caps at their defaults (issue 10): the chart's 256 MiB limit holds under a
partial-frame flood and a many-ranks flood. RSS of a real sidecar process, printed for the report."""

from __future__ import annotations

import os
import socket

import pytest

from adamwatch import wire
from .sidecar_testlib import hello_payload, http_get, wait_for

M = wire.MessageType
CHART_LIMIT = 256 * 2**20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_rss_stays_under_the_chart_limit_under_partial_frame_and_many_ranks_floods(start_sidecar) -> None:
    car = start_sidecar()
    pid = car.proc.pid
    path = wire.parse_endpoint(car.endpoint).path
    start = rss(pid)
    held = []
    # 200 connections each holding a nearly complete 1 MiB frame (took RSS to 235 MB before the caps)
    length = 2**20 - 16
    chunk = b"[" + b"0" * (length - 9)  # all but the last 8 bytes of the frame
    for rank in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(wire.encode_frame(M.HELLO, hello_payload(job="flood", rank=rank, world_size=10_000,
                                                           session=f"f{rank}")))
        try:
            s.sendall(wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(M.STEP), length) + chunk)
        except OSError:
            pass  # the sidecar already closed it (buffer_limit)
        held.append(s)
    key = ("adamwatch_sidecar_connections_refused_total", frozenset({("reason", "buffer_limit")}))
    # the sidecar reads the 200 MiB sent as fast as it can; wait until it has seen it all
    buffer_refusals = wait_for(lambda: car.metrics().get(key, 0) >= 150 and car.metrics()[key], timeout=20,
                               interval=0.5, what="buffer_limit refusals")
    partial_peak = rss(pid)
    for s in held:
        s.close()
    # 10,000 fake ranks of one job: the trainer cap (2,048) stops them
    ranks = []
    for rank in range(10_000):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        try:
            s.sendall(wire.encode_frame(M.HELLO, hello_payload(job="many", rank=rank, world_size=10_000,
                                                               session=f"m{rank}")))
        except OSError:
            pass
        ranks.append(s)
        if len(ranks) >= 3000:  # keep the test's own descriptors bounded; closed ranks stay in the state
            ranks.pop(0).close()
    status, _, body = http_get(car.metrics_url + "/metrics", timeout=30)
    ranks_peak = rss(pid)
    values = car.metrics()
    trainers = sum(1 for (name, _), _v in values.items() if name == "adamwatch_trainer_connected")
    for s in ranks:
        s.close()
    print(f"\nRSS: start {start / 2**20:.0f} MiB, 200 partial 1 MiB frames {partial_peak / 2**20:.0f} MiB "
          f"({buffer_refusals:.0f} closed for buffer_limit), 10,000 fake ranks {ranks_peak / 2**20:.0f} MiB "
          f"({trainers} trainers kept, /metrics {len(body) / 2**20:.1f} MiB); chart limit 256 MiB")
    assert status == 200
    assert buffer_refusals >= 150
    assert trainers <= 2048 + 200
    assert partial_peak < CHART_LIMIT and ranks_peak < CHART_LIMIT
