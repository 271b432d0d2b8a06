"""HTTP servers under slow, hostile clients (issue 10): a bounded worker pool, absolute header and body
deadlines, the control token checked before a body is read, deeply nested JSON answered 400."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.http_server import HttpServer
from adamwatch_sidecar.server import Sidecar

TOKEN = "control-token-for-tests"


def hello_route(headers, body):
    return 200, "text/plain", b"hello\n"


def get(port: int, path: str = "/hello", timeout: float = 10.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_slow_header_clients_hold_a_bounded_pool_and_are_cut_off_and_counted() -> None:
    reasons: list[str] = []
    srv = HttpServer("127.0.0.1:0", {("GET", "/hello"): hello_route}, name="t", workers=4,
                     request_timeout=0.5, on_reject=reasons.append)
    srv.start()
    threads_before = threading.active_count()
    slow = []
    try:
        for _ in range(40):  # each sends a request line and never finishes its headers
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        time.sleep(0.2)
        # no thread per connection: the pool is all there is
        assert threading.active_count() <= threads_before + 1
        assert get(srv.port) == 200  # served once the slow ones have been cut off
        deadline = time.monotonic() + 20
        while reasons.count("header_timeout") < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reasons.count("header_timeout") == 40
    finally:
        for s in slow:
            s.close()
        srv.stop()


def test_the_header_deadline_is_absolute_a_trickle_does_not_extend_it() -> None:
    reasons: list[str] = []
    srv = HttpServer("127.0.0.1:0", {("GET", "/hello"): hello_route}, name="t", workers=2,
                     request_timeout=1.0, on_reject=reasons.append)
    srv.start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port))
        started = time.monotonic()
        closed_after = None
        for ch in b"GET /hello HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([ch]))
                time.sleep(0.1)  # a byte every 100 ms: each read is quick, the whole is not
                s.setblocking(False)
                try:
                    if s.recv(10) == b"":
                        closed_after = time.monotonic() - started
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None, "the trickling client was never cut off"
        assert reasons == ["header_timeout"]
        s.close()
    finally:
        srv.stop()


@pytest.fixture
def control_sidecar(tmp_path):
    from adamwatch_sidecar.remediation.wiring import attach

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = build_config({"listen": "tcp://127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                           "control_address": "127.0.0.1:0", "control_token_file": str(token_file)})
    car = Sidecar(config)
    service = attach(car, config.remediation, environ={})
    car.start()
    try:
        yield car, service.control_server
    finally:
        car.stop()
        service.shutdown()


def test_the_control_api_checks_the_token_before_reading_a_body(control_sidecar) -> None:
    car, control = control_sidecar
    s = socket.create_connection(("127.0.0.1", control.port), timeout=5)
    # announces 1 MiB and sends none of it: without a token it must be answered at once
    s.sendall(b"POST /api/v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1048576\r\n\r\n")
    started = time.monotonic()
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.0 401") or answer.startswith(b"HTTP/1.1 401"), answer
    assert time.monotonic() - started < control.body_timeout
    s.close()
    assert car.state.value("adamwatch_control_requests_rejected_total",
                           {"endpoint": "actions", "reason": "missing_token"}) == 1


def test_a_deeply_nested_json_body_is_a_400_not_a_500(control_sidecar) -> None:
    car, control = control_sidecar
    conn = http.client.HTTPConnection("127.0.0.1", control.port, timeout=10)
    body = b"[" * 200_000 + b"]" * 200_000
    conn.request("POST", "/api/v1/actions", body=body,
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400, response.read()
    conn.close()
    assert car.state.value("adamwatch_control_requests_rejected_total",
                           {"endpoint": "actions", "reason": "malformed"}) == 1


def test_metrics_server_counts_refused_requests_by_reason(control_sidecar) -> None:
    car, _ = control_sidecar
    port = car.metrics_server.port
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    assert b" 400 " in s.recv(4096)
    s.close()
    assert car.state.value("adamwatch_sidecar_http_requests_rejected_total", {"reason": "bad_request"}) == 1
    assert car.state.value("adamwatch_sidecar_http_requests_rejected_total", {"reason": "header_timeout"}) == 0
