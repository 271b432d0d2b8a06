"""Issue 10 finding 9: hostile HELLOs cannot grow the sidecar's log without bound.

50 HELLOs whose fields are 200 KB each (10 MB of input) against a real sidecar
process: its log (stderr) grows by a few KB at most (strings truncated, repeated
warnings rate-limited per reason), and /metrics still answers.
"""

from __future__ import annotations

import pytest

from adamwatch import wire
from .sidecar_testlib import TrainerSocket, hello_payload, http_get

M = wire.MessageType
LOG_BUDGET_BYTES = 16 * 1024


@pytest.fixture
def car(start_sidecar):
    return start_sidecar()  # a real sidecar process (killed by the fixture)


def test_fifty_huge_hellos_log_a_few_kb(car) -> None:
    before = len(car.stderr)
    huge = "h" * 200_000
    for index in range(50):
        hello = hello_payload(job=f"{huge}{index}" if index % 2 else "ok", session=huge, rank=index % 4)
        hello["run_name"] = huge
        t = TrainerSocket(car.endpoint)
        try:
            t.send(M.HELLO, hello)
        except OSError:
            pass  # refused mid-send: fine, that is the point
        t.close()
    status, _, _ = http_get(car.metrics_url + "/metrics")
    assert status == 200
    grown = len(car.stderr) - before
    print(f"log grew {grown} bytes for 50 HELLOs of ~600 KB each")
    assert grown <= LOG_BUDGET_BYTES, f"log grew {grown} bytes for 50 hostile HELLOs:\n{car.stderr[-2000:]}"
