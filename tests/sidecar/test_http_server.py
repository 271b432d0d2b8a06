"""HttpServer: route table, errors by status, reusable with another route table."""

from __future__ import annotations

import http.client
import json

import pytest

from adamwatch_sidecar.http_server import HttpServer, parse_address


@pytest.fixture
def server():
    seen = {}

    def echo(headers, body):
        seen["auth"] = headers.get("authorization")
        return 201, "application/json", json.dumps({"got": body.decode()}).encode()

    def boom(headers, body):
        raise RuntimeError("handler bug")

    srv = HttpServer("127.0.0.1:0", {("POST", "/api/v1/echo"): echo, ("GET", "/boom"): boom},
                     name="test", max_body_bytes=100)
    srv.start()
    srv.seen = seen
    yield srv
    srv.stop()


def request(srv: HttpServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.getheader("Allow"), resp.read()
    finally:
        conn.close()


def test_routes_get_headers_and_body(server: HttpServer) -> None:
    status, ctype, _, body = request(server, "POST", "/api/v1/echo?x=1", b"hi", {"Authorization": "Bearer t"})
    assert (status, ctype, json.loads(body)) == (201, "application/json", {"got": "hi"})
    assert server.seen["auth"] == "Bearer t"


def test_errors(server: HttpServer) -> None:
    assert request(server, "GET", "/nope")[0] == 404
    status, _, allow, _ = request(server, "GET", "/api/v1/echo")
    assert (status, allow) == (405, "POST")
    assert request(server, "POST", "/api/v1/echo", b"x" * 101)[0] == 413
    assert request(server, "GET", "/boom")[0] == 500
    assert request(server, "POST", "/api/v1/echo", b"still fine")[0] == 201


def test_stop_releases_the_port() -> None:
    srv = HttpServer("127.0.0.1:0", {})
    srv.start()
    port = srv.port
    srv.stop()
    srv.stop()  # idempotent
    again = HttpServer(f"127.0.0.1:{port}", {})
    again.start()
    again.stop()


@pytest.mark.parametrize("text, expected", [("0.0.0.0:9400", ("0.0.0.0", 9400)), (":9400", ("", 9400)),
                                            ("[::1]:80", ("::1", 80))])
def test_parse_address(text: str, expected: tuple) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9400", "host:abc", "host:70000", None])
def test_parse_address_errors(text) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
