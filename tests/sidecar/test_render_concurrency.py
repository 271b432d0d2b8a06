"""Ingest keeps flowing while a /metrics render is in progress (issue 15): in-process sidecar, real sockets.

The render is stopped while it writes one trainer's lines (the formatting, which
runs outside the run state's lock); another trainer's steps must still be applied.
"""

from __future__ import annotations

import pathlib
import threading

import pytest

from adamwatch import wire
from adamwatch_sidecar.collector import RunStateCollector
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.server import Sidecar

from .sidecar_testlib import TrainerSocket, hello_payload, http_get, step_payload, wait_for

M = wire.MessageType


def test_steps_are_applied_while_a_slow_render_is_in_progress(socket_dir: pathlib.Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = build_config(overrides={"listen": f"unix://{socket_dir}/run/adamwatch.sock",
                                  "metrics_address": "127.0.0.1:0", "retention_seconds": 10})
    car = Sidecar(cfg)
    car.start()
    inside, release = threading.Event(), threading.Event()
    write = RunStateCollector._write_segment

    def slow_write(self, specs, part, before):
        # writing the "slow" trainer's lines stops here until the test has sent steps
        if part is not None and part[1] and part[1][0][:1] == ("slow",):
            inside.set()
            release.wait(10)
        return write(self, specs, part, before)

    try:
        slow, busy = TrainerSocket(str(car.ingest.endpoint)), TrainerSocket(str(car.ingest.endpoint))
        slow.send(M.HELLO, hello_payload(job="slow"))
        busy.send(M.HELLO, hello_payload(job="busy"))
        busy.send(M.STEP, step_payload(1))
        wait_for(lambda: car.state.value("adamwatch_steps_total", {"job": "busy", "rank": "0"}) == 1, what="step 1")
        monkeypatch.setattr(RunStateCollector, "_write_segment", slow_write)
        scrape: dict = {}
        scraper = threading.Thread(target=lambda: scrape.update(r=http_get(car.metrics_server.url + "/metrics", 15)))
        scraper.start()
        assert inside.wait(10), "the render never reached the slow trainer"
        for step in range(2, 22):
            busy.send(M.STEP, step_payload(step))
        # 20 steps are applied while the render is still stopped inside the slow trainer
        wait_for(lambda: car.state.value("adamwatch_steps_total", {"job": "busy", "rank": "0"}) == 21,
                 timeout=10, what="steps applied during the render")
        assert scraper.is_alive()
        release.set()
        scraper.join(15)
        status, _, body = scrape["r"]
        assert status == 200 and b'adamwatch_steps_total{job="slow",rank="0"} 0.0' in body
        slow.close()
        busy.close()
    finally:
        release.set()
        car.stop()
