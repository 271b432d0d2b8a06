"""A real `adamwatch-sidecar` process over real sockets: frames in, /metrics out, lifecycle."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import time

import pytest

from adamwatch import wire
from .sidecar_testlib import (
    TrainerSocket,
    deep_entry,
    hello_payload,
    http_get,
    isnan,
    series,
    step_payload,
    wait_for,
)

M = wire.MessageType


def test_frames_from_a_plain_socket_show_up_in_metrics(start_sidecar) -> None:
    car = start_sidecar()
    assert http_get(car.metrics_url + "/readyz")[0] == 200
    assert http_get(car.metrics_url + "/healthz")[0] == 200
    t = car.trainer()
    t.send(M.HELLO, hello_payload(job="gpt", rank=3, dropped_total=2))
    t.send(M.STEP, step_payload(1, loss=4.0, samples=16, tokens=2048))
    t.send(M.STEP, step_payload(2, loss=float("nan"), loss_nonfinite=True, grad_nonfinite=True,
                                skipped=True, skip_reason="guard", samples=16, tokens=2048,
                                deep=[deep_entry(1.0), deep_entry(2.0)]))
    t.send(M.CHECKPOINT, {"event": "known_good", "step": 2, "time": 1_700_000_500.0})
    t.send(M.DROPPED, {"dropped_total": 9})
    T = {"job": "gpt", "rank": 3}
    values = wait_for(lambda: (v := car.metrics()) and series(v, "adamwatch_dropped_summaries_total", **T) == 9 and v,
                      what="the dropped counter")
    assert isnan(series(values, "adamwatch_loss", **T))
    assert series(values, "adamwatch_steps_total", **T) == 2
    assert series(values, "adamwatch_optimizer_step", **T) == 2
    assert series(values, "adamwatch_grad_norm", **T, param_group="all") == 1.5
    assert series(values, "adamwatch_learning_rate", **T, param_group="no_decay") == 5e-4
    assert series(values, "adamwatch_nonfinite_steps_total", **T, source="grad") == 1
    assert series(values, "adamwatch_skipped_steps_total", **T, reason="guard") == 1
    assert series(values, "adamwatch_samples_total", **T) == 32
    assert series(values, "adamwatch_tokens_total", **T) == 4096
    assert series(values, "adamwatch_step_duration_seconds_count", **T) == 2
    assert series(values, "adamwatch_effective_learning_rate", **T, param_group="no_decay", quantile="0.99") == 10.0
    assert series(values, "adamwatch_deep_stats_step", **T) == 2
    assert series(values, "adamwatch_last_known_good_checkpoint_step", **T) == 2
    assert series(values, "adamwatch_trainer_connected", **T) == 1
    assert series(values, "adamwatch_sidecar_connections") == 1
    t.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_real_exposition(start_sidecar) -> None:
    car = start_sidecar()
    t = car.trainer()
    t.send(M.HELLO, hello_payload(job="lint"))
    t.send(M.STEP, step_payload(1, samples=1, tokens=1, skipped=True, skip_reason="guard",
                                deep=[deep_entry(), deep_entry()]))
    t.send(M.CHECKPOINT, {"event": "saved", "step": 1, "time": 1.7e9})
    t.send_raw(b"garbage!")
    wait_for(lambda: series(car.metrics(), "adamwatch_frames_rejected_total", reason="bad_magic") == 1, what="reject")
    body = http_get(car.metrics_url + "/metrics")[2]
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    complaints = [c for c in (result.stdout + result.stderr).decode().splitlines() if c.strip()
                  and 'should not have "quantile" label' not in c]  # known table gap, see test_collector
    assert not complaints, complaints


def _good_trainer(endpoint: str, rank: int, steps: int, errors: list) -> None:
    try:
        t = TrainerSocket(endpoint, timeout=20)
        t.send(M.HELLO, hello_payload(job="fleet", rank=rank, session=f"s{rank}", world_size=20))
        batch = []
        for step in range(1, steps + 1):
            batch.append(wire.encode_frame(M.STEP, step_payload(
                step, loss=rank + step / 1000, grad_norm=rank * 10.0 + step, samples=rank + 1,
                group_grad_norms=[float(rank), float(step)], lr=[1e-3 * (rank + 1), 1e-4])))
            if len(batch) == 50:
                t.send_raw(b"".join(batch))
                batch = []
        t.send_raw(b"".join(batch))
        t.send(M.DROPPED, {"dropped_total": rank})
        t.hold = t  # keep it open until the test closes it
        errors.append(t)
    except Exception as exc:  # reported by the test
        errors.append(exc)


def _garbage_trainer(endpoint: str, seed: int, stop: threading.Event, counts: list) -> None:
    rng = random.Random(seed)
    path = wire.parse_endpoint(endpoint).path
    while not stop.is_set():
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            kind = rng.randrange(4)
            if kind == 0:
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))))
            elif kind == 1:  # valid start, then garbage mid-stream
                s.sendall(wire.encode_frame(M.HELLO, hello_payload(job="garbage", rank=seed)) + b"\x00" * 64)
            elif kind == 2:  # oversized header
                s.sendall(wire.HEADER.pack(wire.MAGIC, 1, int(M.STEP), 2**31))
            else:  # schema violations and steps before hello
                s.sendall(wire.encode_frame(M.STEP, {"step": "x"}) + wire.encode_frame(M.STEP, step_payload(1)))
            s.close()
            counts.append(kind)
        except OSError:
            counts.append(-1)


@pytest.mark.slow
def test_twenty_good_connections_and_garbage_at_once(start_sidecar) -> None:
    car = start_sidecar()
    steps = 300
    stop = threading.Event()
    garbage_counts: list = []
    garbage = [threading.Thread(target=_garbage_trainer, args=(car.endpoint, seed, stop, garbage_counts), daemon=True)
               for seed in range(4)]
    scrape_status: list = []

    def scraper() -> None:
        while not stop.is_set():
            start = time.monotonic()
            status = http_get(car.metrics_url + "/metrics", timeout=5)[0]
            scrape_status.append((status, time.monotonic() - start))

    scrapers = [threading.Thread(target=scraper, daemon=True)]
    for th in garbage + scrapers:
        th.start()
    results: list = []
    good = [threading.Thread(target=_good_trainer, args=(car.endpoint, rank, steps, results)) for rank in range(20)]
    for th in good:
        th.start()
    for th in good:
        th.join(60)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(results) == 20

    def all_done():
        v = car.metrics()
        return v if all(series(v, "adamwatch_dropped_summaries_total", job="fleet", rank=r) == r
                        for r in range(20)) else None

    values = wait_for(all_done, timeout=30, interval=0.2, what="every good trainer's last frame")
    stop.set()
    for th in garbage + scrapers:
        th.join(10)
    for rank in range(20):
        T = {"job": "fleet", "rank": rank}
        assert series(values, "adamwatch_steps_total", **T) == steps
        assert series(values, "adamwatch_optimizer_step", **T) == steps
        assert series(values, "adamwatch_loss", **T) == rank + steps / 1000
        assert series(values, "adamwatch_grad_norm", **T, param_group="all") == rank * 10.0 + steps
        assert series(values, "adamwatch_grad_norm", **T, param_group="decay") == float(rank)
        assert series(values, "adamwatch_learning_rate", **T, param_group="decay") == 1e-3 * (rank + 1)
        assert series(values, "adamwatch_samples_total", **T) == (rank + 1) * steps
        assert series(values, "adamwatch_trainer_connected", **T) == 1
    assert len([k for k in garbage_counts if k >= 0]) >= 8, "the garbage senders barely ran"
    # every garbage connection has been processed once only the good ones remain open
    after = wait_for(lambda: (v := car.metrics()) and series(v, "adamwatch_sidecar_connections") == 20 and v,
                     what="the garbage connections to be closed")
    rejected = sum(v for (name, labels), v in after.items() if name == "adamwatch_frames_rejected_total")
    assert rejected >= len([k for k in garbage_counts if k in (0, 2)])
    assert series(values, "adamwatch_frames_rejected_total", reason="oversized") >= 1
    assert scrape_status and all(status == 200 for status, _ in scrape_status)
    assert car.proc.poll() is None
    for r in results:
        r.close()


@pytest.mark.slow
def test_disconnect_then_series_go_after_retention(start_sidecar) -> None:
    car = start_sidecar(retention=1.0)
    t = car.trainer()
    t.send(M.HELLO, hello_payload(job="leaver"))
    t.send(M.STEP, step_payload(1, loss=0.5))
    T = {"job": "leaver", "rank": 0}
    wait_for(lambda: series(car.metrics(), "adamwatch_loss", **T) == 0.5, what="the loss")
    t.close()
    values = wait_for(lambda: (v := car.metrics()) and series(v, "adamwatch_trainer_connected", **T) == 0 and v,
                      what="trainer_connected 0")
    assert series(values, "adamwatch_loss", **T) == 0.5  # last values stay during retention
    disconnected = time.monotonic()
    wait_for(lambda: series(car.metrics(), "adamwatch_trainer_connected", **T) is None, timeout=10,
             what="the series to expire")
    assert time.monotonic() - disconnected >= 0.5
    assert series(car.metrics(), "adamwatch_loss", **T) is None


def test_sigterm_exits_0_and_removes_the_socket(start_sidecar) -> None:
    car = start_sidecar()
    t = car.trainer()
    t.send(M.HELLO, hello_payload())
    assert car.socket_path.exists()
    assert car.terminate() == 0
    assert not car.socket_path.exists()
    assert "received SIGTERM" in car.stderr
    t.close()


def test_a_stale_socket_file_is_replaced_and_a_live_one_is_refused(start_sidecar, socket_dir) -> None:
    first = start_sidecar()
    # a second sidecar on the live socket must refuse, not steal it
    path = first.socket_path
    from .sidecar_testlib import SidecarProcess

    second = SidecarProcess(["--listen", f"unix://{path}", "--metrics-address", "127.0.0.1:0"], path)
    try:
        assert second.proc.wait(15) == 1
    finally:
        second.kill()
    assert "in use" in second.stderr
    first.proc.kill()  # SIGKILL leaves the socket file behind
    first.proc.wait(5)
    assert path.exists()
    third = SidecarProcess(["--listen", f"unix://{path}", "--metrics-address", "127.0.0.1:0"], path)
    try:
        third.wait_ready()
        t = third.trainer()
        t.send(M.HELLO, hello_payload(job="after-crash"))
        wait_for(lambda: series(third.metrics(), "adamwatch_trainer_connected", job="after-crash", rank=0) == 1,
                 what="hello after the stale socket was replaced")
        t.close()
        assert third.terminate() == 0
    finally:
        third.kill()


def test_tcp_listen_and_commands_over_the_real_process(start_sidecar) -> None:
    car = start_sidecar("--listen", "tcp://127.0.0.1:0")
    assert car.endpoint.startswith("tcp://127.0.0.1:")
    t = car.trainer()
    t.send(M.HELLO, hello_payload(job="tcp"))
    t.send(M.STEP, step_payload(1, loss=0.25))
    wait_for(lambda: series(car.metrics(), "adamwatch_loss", job="tcp", rank=0) == 0.25, what="loss over tcp")
    t.close()
