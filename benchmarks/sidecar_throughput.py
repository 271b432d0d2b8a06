"""Sidecar benchmark: ingest rate on one core and /metrics render time with 64 ranks.

    .venv/bin/python benchmarks/sidecar_throughput.py            # about 20 s

1. Starts a real ``adamwatch-sidecar`` process pinned to one core (where the OS
   lets us), fed by a separate process over the Unix socket, several connections,
   as fast as it can. The rate is summaries accepted per second: the time from
   the first frame sent until ``adamwatch_steps_total`` (summed over trainers, read
   from /metrics) reaches the number sent.
2. Connects 64 ranks with 4 param groups and deep statistics, then times 20
   GETs of /metrics (wall time seen by the client) and reports the median.

Targets: >= 50,000 summaries/s; render <= 25 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from adamwatch import wire

TARGET_RATE = 50_000
TARGET_RENDER_MS = 25.0
GROUPS = ["embeddings", "decay", "no_decay", "head"]


def _hello(job: str, rank: int) -> dict:
    return {
        "job": job, "rank": rank, "world_size": 64, "host": "bench", "pid": os.getpid(), "session": f"{job}-{rank}",
        "adamwatch_version": "bench", "torch_version": "bench",
        "optimizer": {"kind": "AdamW", "implementation": "fused", "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.1, "amsgrad": False, "param_groups": GROUPS, "device": "cuda"},
    }


def _step(step: int, deep: bool) -> dict:
    payload = {
        "step": step, "time": 1.7e9 + step * 0.1, "duration_s": 0.1, "loss": 2.0 + 1.0 / step,
        "loss_nonfinite": False, "grad_norm": 1.25, "group_grad_norms": [0.5, 0.75, 0.25, 0.125],
        "grad_nonfinite": False, "lr": [3e-4, 3e-4, 3e-4, 3e-4],
        "skipped": False, "skip_reason": None, "samples": 32, "tokens": 32768,
    }
    if deep:
        entry = {"effective_lr": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "update_size": [1e-7, 1e-6, 1e-5, 1e-4, 1e-3],
                 "update_to_weight": 1e-3, "exp_avg_norm": 0.5, "exp_avg_sq_norm": 0.01, "eps_dominated_ratio": 0.02}
        payload["deep"] = [entry] * len(GROUPS)
    return payload


def _connect(endpoint: str) -> socket.socket:
    ep = wire.parse_endpoint(endpoint)
    if ep.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(ep.path)
        return sock
    return socket.create_connection((ep.host, ep.port))


def _feed(endpoint: str, connections: int, per_connection: int, core: int | None, started, done) -> None:
    """Feeder process: HELLO on each connection, then STEP frames as fast as the socket takes them."""
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except (AttributeError, OSError):
            pass
    socks = [_connect(endpoint) for _ in range(connections)]
    for rank, sock in enumerate(socks):
        sock.sendall(wire.encode_frame(wire.MessageType.HELLO, _hello("ingest", rank)))
    # one pre-encoded batch of 1000 steps (deep statistics every 10th), sent repeatedly
    batch = b"".join(wire.encode_frame(wire.MessageType.STEP, _step(i, i % 10 == 0)) for i in range(1, 1001))
    batches = per_connection // 1000
    started.set()
    threads = [threading.Thread(target=lambda s=s: [s.sendall(batch) for _ in range(batches)]) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.wait(120)  # keep the connections open until the sidecar has read everything
    for s in socks:
        s.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _steps_total(text: str, job: str) -> float:
    pattern = re.compile(r'^adamwatch_steps_total\{job="' + re.escape(job) + r'",rank="\d+"\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


def _start_sidecar(endpoint: str, core: int | None, config: str | None) -> tuple[subprocess.Popen, str]:
    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    proc = subprocess.Popen(
        [sys.executable, "-m", "adamwatch_sidecar.cli", "serve", "--listen", endpoint,
         "--metrics-address", "127.0.0.1:0", "--log-level", "INFO", *(["--config", config] if config else [])],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=pin,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    url = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"metrics=(\S+)", line)
        if "adamwatch-sidecar ready" in line and match:
            url = match.group(1)
            break
    if not url:
        proc.kill()
        raise SystemExit("the sidecar did not start")
    # keep draining stderr so the sidecar never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summaries", type=int, default=400_000, help="STEP frames to send (multiple of 1000 x connections)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=64, help="ranks connected for the render measurement")
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--config", help="sidecar config file (e.g. to compare with remediation disabled)")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    sidecar_core = cores[-1] if cores else None
    feeder_core = cores[0] if len(cores) > 1 else None
    folder = tempfile.mkdtemp(prefix="aw-bench-", dir="/tmp")
    endpoint = f"unix://{folder}/adamwatch.sock"
    proc, url = _start_sidecar(endpoint, sidecar_core, args.config)
    try:
        per_connection = max(1000, args.summaries // args.connections // 1000 * 1000)
        total = per_connection * args.connections
        ctx = multiprocessing.get_context("spawn")
        started, done = ctx.Event(), ctx.Event()
        feeder = ctx.Process(target=_feed, args=(endpoint, args.connections, per_connection, feeder_core, started, done))
        feeder.start()
        if not started.wait(60):
            raise SystemExit("the feeder did not start")
        t0 = time.perf_counter()
        while True:
            seen = _steps_total(_scrape(url), "ingest")
            if seen >= total:
                break
            if time.perf_counter() - t0 > 60:
                raise SystemExit(f"only {seen:.0f} of {total} summaries arrived within 60 s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        done.set()
        feeder.join(30)
        rate = total / elapsed

        # 64 ranks, 4 param groups, deep statistics: the render measurement
        socks = []
        for rank in range(args.ranks):
            s = _connect(endpoint)
            s.sendall(wire.encode_frame(wire.MessageType.HELLO, _hello("render", rank))
                      + wire.encode_frame(wire.MessageType.STEP, _step(10, True)))
            socks.append(s)
        deadline = time.monotonic() + 30
        while _steps_total(_scrape(url), "render") < args.ranks and time.monotonic() < deadline:
            time.sleep(0.05)
        times, size, lines = [], 0, 0
        for _ in range(args.scrapes):
            start = time.perf_counter()
            text = _scrape(url)
            times.append(time.perf_counter() - start)
            size, lines = len(text), text.count("\n")
        for s in socks:
            s.close()
        render_ms = statistics.median(times) * 1000
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)

    print(f"config: {args.config or 'defaults (remediation as shipped)'}; load average {os.getloadavg()[0]:.1f}")
    pinned = f"pinned to core {sidecar_core}" if sidecar_core is not None else "not pinned"
    print(f"sidecar {pinned}; feeder in a separate process ({args.connections} connections)"
          + (f" on core {feeder_core}" if feeder_core is not None else ""))
    print(f"ingest: {total} summaries in {elapsed:.2f} s = {rate:,.0f} summaries/s "
          f"(target >= {TARGET_RATE:,}) {'OK' if rate >= TARGET_RATE else 'BELOW TARGET'}")
    print(f"/metrics with {args.ranks} ranks x {len(GROUPS)} param groups (deep statistics): "
          f"median {render_ms:.1f} ms over {args.scrapes} scrapes, {lines} lines, {size / 1024:.0f} KiB "
          f"(target <= {TARGET_RENDER_MS:.0f} ms) {'OK' if render_ms <= TARGET_RENDER_MS else 'ABOVE TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
