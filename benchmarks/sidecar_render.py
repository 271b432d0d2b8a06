"""Sidecar benchmark: /metrics render time at 64, 256 and 1,024 ranks, and ingest during scrapes.

    .venv/bin/python benchmarks/sidecar_render.py            # about a minute

In one process, over a real RunState (4 param groups, deep statistics, like
benchmarks/sidecar_throughput.py):

1. Render time, p50 and p95, of the full renderer (one snapshot, every line
   formatted: /metrics before issue 15) and of the incremental one (/metrics now:
   a trainer's bytes are reused until it changes), in three cases: "idle" (no
   step between scrapes), "all stepped" (every trainer applied a step with a
   deep block between two scrapes; the deep values repeat) and "all new" (the
   same, with every value new and as long to write as a float32 statistic's:
   the worst case, where every line of every trainer is written again).
2. Ingest rate (RunState.apply of STEP messages on a thread, as the sidecar's
   ingest does) for a few seconds without scrapes and with a scrape every second
   at 1,024 ranks; min/median/max over 3 repeats and the ratio.

Figures are for the machine it runs on; ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adamwatch import wire  # noqa: E402
from adamwatch_sidecar.collector import RunStateCollector  # noqa: E402
from adamwatch_sidecar.run_state import RunState  # noqa: E402
from sidecar_throughput import _hello, _step  # noqa: E402

STEP = wire.MessageType.STEP


def _state(ranks: int) -> tuple[RunState, list]:
    state = RunState()
    keys = [state.hello(("bench", rank), _hello("render", rank)) for rank in range(ranks)]
    for key in keys:
        state.apply(key, wire.Message(STEP, _step(1, True)))
    return state, keys


def _pct(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


def _float32(value: float) -> float:
    """``value`` rounded to a float32, as a statistic computed on the device arrives."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _all_new(step: int, rank: int) -> dict:
    """A STEP with a deep block whose every value differs from the last one's (float32-like digits)."""
    payload = _step(step, True)
    scale = _float32(1.0 + 1e-3 * step + 1e-6 * rank)

    def new(value: float) -> float:
        return _float32(value * scale)

    for name in ("loss", "grad_norm", "duration_s"):
        payload[name] = new(payload[name])
    payload["group_grad_norms"] = [new(v) for v in payload["group_grad_norms"]]
    payload["lr"] = [new(v) for v in payload["lr"]]
    payload["deep"] = [{name: [new(v) for v in value] if isinstance(value, list) else new(value)
                        for name, value in entry.items()} for entry in payload["deep"]]
    return payload


CASES = ("idle", "all stepped", "all new")


def _render_times(ranks: int, scrapes: int) -> dict[str, list[float]]:
    state, keys = _state(ranks)
    collector = RunStateCollector(state)
    full = RunStateCollector(state)
    out: dict[str, list[float]] = {f"{kind} {case}": [] for case in CASES for kind in ("full", "incr")}
    collector.render_text(), full._render(state.snapshot())  # warm both caches, as after the first scrape
    step = 2
    for _ in range(scrapes):
        t0 = time.perf_counter()
        full._render(state.snapshot())
        t1 = time.perf_counter()
        collector.render_text()
        t2 = time.perf_counter()
        out["full idle"].append(t1 - t0)
        out["incr idle"].append(t2 - t1)
        for case, make in (("all stepped", lambda step, rank: _step(step, True)), ("all new", _all_new)):
            for kind, render in (("full", lambda: full._render(state.snapshot())), ("incr", collector.render_text)):
                step += 1
                for rank, key in enumerate(keys):
                    state.apply(key, wire.Message(STEP, make(step, rank)))
                t0 = time.perf_counter()
                render()
                out[f"{kind} {case}"].append(time.perf_counter() - t0)
    return out


def _ingest_rate(state: RunState, keys: list, seconds: float, scrape: bool) -> float:
    stop = threading.Event()
    applied = [0]

    def ingest() -> None:
        messages = [wire.Message(STEP, _step(s, False)) for s in range(2, 202)]
        n = 0
        while not stop.is_set():
            for message in messages:
                state.apply(keys[n % len(keys)], message)
                n += 1
        applied[0] = n

    collector = RunStateCollector(state)
    thread = threading.Thread(target=ingest)
    start = time.perf_counter()
    thread.start()
    while time.perf_counter() - start < seconds:
        if scrape:
            collector.render_text()
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - start) % 1.0))
    stop.set()
    thread.join()
    return applied[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--scrapes", type=int, default=8, help="scrapes timed per case and rank count")
    parser.add_argument("--ingest-seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    print("render (ms)   ranks  p50 full  p95 full  p50 incr  p95 incr  (full = before issue 15, incr = /metrics now)")
    for ranks in args.ranks:
        times = _render_times(ranks, args.scrapes)
        for case in CASES:
            f, i = times[f"full {case}"], times[f"incr {case}"]
            print(f"  {case:<12}{ranks:>6}  {_pct(f, .5):8.1f}  {_pct(f, .95):8.1f}  {_pct(i, .5):8.1f}  {_pct(i, .95):8.1f}"
                  f"  (full/incr p50 {_pct(f, .5) / max(_pct(i, .5), 1e-9):.1f}x)")

    state, keys = _state(max(args.ranks))
    quiet, scraped = [], []
    for _ in range(args.repeats):
        quiet.append(_ingest_rate(state, keys, args.ingest_seconds, scrape=False))
        scraped.append(_ingest_rate(state, keys, args.ingest_seconds, scrape=True))

    def mmm(rates: list[float]) -> str:
        return f"min {min(rates):,.0f}  median {statistics.median(rates):,.0f}  max {max(rates):,.0f} steps/s"

    print(f"ingest, {max(args.ranks)} ranks, no scrapes:        {mmm(quiet)}")
    print(f"ingest, {max(args.ranks)} ranks, scrape every 1 s:  {mmm(scraped)}")
    print(f"ingest with scrapes / without: {statistics.median(scraped) / statistics.median(quiet):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
