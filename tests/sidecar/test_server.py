"""Sidecar composition root: tickers, extra HTTP servers, readiness, clean stop (in-process, real sockets)."""

from __future__ import annotations

import pathlib

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.http_server import HttpServer
from adamwatch_sidecar.server import Sidecar
from .sidecar_testlib import TrainerSocket, hello_payload, http_get, wait_for

M = wire.MessageType


def make(socket_dir: pathlib.Path, **kwargs) -> Sidecar:
    cfg = build_config(overrides={"listen": f"unix://{socket_dir}/run/adamwatch.sock",
                                  "metrics_address": "127.0.0.1:0", "retention_seconds": 10})
    return Sidecar(cfg, **kwargs)


def test_tickers_get_the_injected_clock_and_drive_expiry(socket_dir: pathlib.Path) -> None:
    now = [5000.0]
    car = make(socket_dir, clock=lambda: now[0], tick_interval=0.02)
    ticks: list[float] = []
    car.add_ticker(ticks.append)
    car.add_ticker(lambda now: 1 / 0)  # a failing ticker must not stop the others
    car.start()
    try:
        t = TrainerSocket(str(car.ingest.endpoint))
        t.send(M.HELLO, hello_payload(job="tick"))
        wait_for(lambda: car.state.is_connected(("tick", 0)), what="hello")
        t.close()
        wait_for(lambda: car.state.value("adamwatch_trainer_connected", {"job": "tick", "rank": "0"}) == 0,
                 what="disconnect")
        ticks.clear()
        wait_for(lambda: len(ticks) >= 2, what="ticks")
        assert set(ticks) == {5000.0}
        assert car.state.keys() == [("tick", 0)]  # within retention: still there
        now[0] = 5000.0 + 10
        wait_for(lambda: car.state.keys() == [], what="expiry by the ticker")
    finally:
        car.stop()


def test_extra_http_servers_live_and_die_with_the_sidecar(socket_dir: pathlib.Path) -> None:
    car = make(socket_dir)
    control = HttpServer("127.0.0.1:0", {("GET", "/api/v1/status"): lambda h, b: (200, "application/json", b"{}")},
                         name="control")
    car.add_http_server(control)
    car.start()
    try:
        assert http_get(control.url + "/api/v1/status")[0] == 200
        url = control.url
    finally:
        car.stop()
    try:
        http_get(url + "/api/v1/status", timeout=1)
        raise AssertionError("the control server still answers after stop")
    except OSError:
        pass


def test_readyz_is_503_until_ingest_listens_and_stop_removes_the_socket(socket_dir: pathlib.Path) -> None:
    car = make(socket_dir)
    car.metrics_server.start()  # as during start(), before the ingest socket is bound
    try:
        status, _, body = http_get(car.metrics_server.url + "/readyz")
        assert status == 503 and b"not ready" in body
        assert http_get(car.metrics_server.url + "/healthz")[0] == 200
    finally:
        car.metrics_server.stop()
    car.start()
    try:
        assert http_get(car.metrics_server.url + "/readyz")[0] == 200
        assert pathlib.Path(car.ingest.endpoint.path).exists()
    finally:
        car.stop()
    assert not pathlib.Path(car.ingest.endpoint.path).exists()
    assert car.ingest.listening is False
    car.stop()  # idempotent
