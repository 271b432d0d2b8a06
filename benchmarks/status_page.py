"""Status page benchmark: what the history listener adds per STEP, the data endpoint's latency, the memory bound.

    .venv/bin/python benchmarks/status_page.py            # about 30 s

All times are CPU time of the measuring thread (``time.thread_time``) except
the endpoint's, which is wall time seen by the client: on a shared machine wall
time also counts other processes' turns.

1. Listener cost. Two run states side by side, fed the same STEP messages
   (64 trainers, 4 param groups, deep statistics every 10 steps) in alternating
   rounds: one bare, one with the status page's listeners (step history and
   event log). Reported: microseconds per STEP of each, their difference, the
   ratio, and the listener alone once every window is full (so the cost of
   folding old steps into downsampled buckets is included), with the slowest
   single call (a fold). The sidecar's ingest budget at 50,000 summaries/s is
   20 us per STEP, frame decoding included.
2. Endpoint latency. A real sidecar's metrics server with one trainer holding
   10,000 steps: the full ``GET /api/v1/series`` (what a page loads first) and an
   incremental poll (``since=``), median and max of 20 requests each, wall time
   seen by the client. Target: <= 50 ms for the full answer.
3. Memory. How many full-resolution steps each trainer keeps as the number of
   trainers grows, and the bytes of their buffers at that size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sidecar_throughput import GROUPS, _hello, _step  # noqa: E402  (the same payloads as the ingest benchmark)

from adamwatch import wire  # noqa: E402
from adamwatch_sidecar.config import build_config  # noqa: E402
from adamwatch_sidecar.run_state import RunState, TrainerKey  # noqa: E402
from adamwatch_sidecar.server import Sidecar  # noqa: E402
from adamwatch_sidecar.status_page import HistoryLimits, StatusPage, StepHistory  # noqa: E402
from adamwatch_sidecar.status_page.api import series_json  # noqa: E402

TARGET_MS = 50.0
BUDGET_US = 1e6 / 50_000


def _messages(steps: int) -> list[wire.Message]:
    return [wire.Message(wire.MessageType.STEP, _step(i, deep=i % 10 == 0)) for i in range(1, steps + 1)]


def _state(trainers: int, with_page: bool) -> tuple[RunState, StepHistory | None]:
    state = RunState(300.0, clock=time.time)
    page = StatusPage(state) if with_page else None  # adds its listener, as in the sidecar
    for rank in range(trainers):
        state.hello(f"c{rank}", _hello("bench", rank))
    return state, None if page is None else page.history


def listener_cost(trainers: int, steps_per_round: int, rounds: int) -> None:
    messages = _messages(steps_per_round // trainers)
    keys = [("bench", rank) for rank in range(trainers)]
    bare, _ = _state(trainers, False)
    paged, _ = _state(trainers, True)
    per_step = {False: [], True: []}
    for r in range(rounds):
        for with_page in ((False, True) if r % 2 == 0 else (True, False)):
            state = paged if with_page else bare
            apply = state.apply
            start = time.thread_time()  # CPU time: on a shared machine, wall time counts other processes' turns
            for message in messages:
                for key in keys:
                    apply(key, message)
            per_step[with_page].append((time.thread_time() - start) / (len(messages) * len(keys)) * 1e6)
    b, p = statistics.median(per_step[False]), statistics.median(per_step[True])
    print(f"RunState.apply per STEP ({trainers} trainers x {len(GROUPS)} groups, {rounds} alternating rounds):")
    print(f"  bare {b:.2f} us, with the status page's listeners {p:.2f} us: +{p - b:.2f} us per STEP "
          f"(ratio {p / b:.3f}; {100 * (p - b) / BUDGET_US:.1f}% of the 20 us per STEP of 50,000 summaries/s)")

    # The listener alone in steady state: one trainer past its window, folding a tenth every 1,000 steps.
    history = StepHistory()
    key = ("bench", 0)
    history.on_message(key, wire.Message(wire.MessageType.HELLO, _hello("bench", 0)))
    steady = _messages(30_000)
    for message in steady[:12_000]:
        history.on_message(key, message)
    calls = []
    on_message = history.on_message
    clock = time.thread_time
    for message in steady[12_000:]:
        t0 = clock()
        on_message(key, message)
        calls.append(clock() - t0)
    total = sum(calls) / len(calls) * 1e6
    print(f"  step history alone, window full (folds included): {total:.2f} us CPU per STEP mean, "
          f"median {statistics.median(calls) * 1e6:.2f} us, slowest call {max(calls) * 1e3:.2f} ms (a fold of 1,000 steps)")


def endpoint_latency(requests: int) -> float:
    config = build_config({"listen": "tcp://127.0.0.1:0", "metrics_address": "127.0.0.1:0"})
    sidecar = Sidecar(config)
    sidecar.start()
    try:
        history = sidecar.status_page.history
        key = sidecar.state.hello("bench-conn", _hello("bench", 0))
        for message in _messages(10_000):  # through the run state, as ingest applies them
            sidecar.state.apply(key, message)
        url = sidecar.metrics_server.url + "/api/v1/series?job=bench&rank=0"

        def timed(u: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            with urllib.request.urlopen(u, timeout=10) as response:
                body = response.read()
            return (time.perf_counter() - t0) * 1e3, len(body)

        timed(url)  # warm the connection path
        full = [timed(url) for _ in range(requests)]
        read = history.read(key)
        poll_url = f"{url}&since={read.last_seq - 1}&epoch={read.epoch}&downsampled={read.buckets_version}"
        poll = [timed(poll_url) for _ in range(requests)]
        cpu = []
        for _ in range(requests):  # the server's own work for the full answer, without the HTTP round trip
            t0 = time.thread_time()
            series_json(TrainerKey(*key), history.read(key))
            cpu.append((time.thread_time() - t0) * 1e3)
    finally:
        sidecar.stop()
    full_ms = statistics.median(t for t, _ in full)
    print(f"GET /api/v1/series, one trainer with 10,000 steps, {len(GROUPS)} groups, deep statistics every 10:")
    print(f"  full answer ({full[0][1] / 1e6:.1f} MB): median {full_ms:.1f} ms, max {max(t for t, _ in full):.1f} ms "
          f"(target <= {TARGET_MS:.0f} ms)")
    print(f"  of which building the JSON: median {statistics.median(cpu):.1f} ms CPU")
    print(f"  incremental poll (one new step): median {statistics.median(t for t, _ in poll):.2f} ms, "
          f"max {max(t for t, _ in poll):.2f} ms")
    return full_ms


def memory_table() -> None:
    limits = HistoryLimits()
    print(f"Memory bound: {limits.total_bytes >> 20} MiB for all trainers, {limits.trainer_bytes >> 20} MiB per trainer, "
          f"at most {limits.steps} steps each (2 param groups, deep statistics every 10):")
    for trainers in (1, 8, 32, 64, 256, 1000):
        plan = limits.plan(trainers, 2, 10)
        each = HistoryLimits.plan_bytes(plan, 2)
        print(f"  {trainers:>5} trainers: {plan.steps:>6} steps each + {plan.buckets:>3} downsampled points, "
              f"{each / 1024:7.0f} KiB each, {each * trainers / 2**20:5.1f} MiB in all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", type=int, default=64)
    parser.add_argument("--steps-per-round", type=int, default=64_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args(argv)
    listener_cost(args.trainers, args.steps_per_round, args.rounds)
    full_ms = endpoint_latency(args.requests)
    memory_table()
    return 0 if full_ms <= TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
