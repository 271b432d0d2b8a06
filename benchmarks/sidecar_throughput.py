"""Sidecar benchmark: ingest rate on one core (packed and JSON STEPs, 64/256/1,024 ranks) and /metrics render time.

    .venv/bin/python benchmarks/sidecar_throughput.py            # about 80 s

1. Ingest: for each STEP encoding (STEP_PACKED, JSON) and rank count (64, 256,
   1,024), a fresh ``adamwatch-sidecar`` process pinned to one core (where the OS
   lets us) is fed by a separate process holding one connection per rank, as a
   fleet of trainers would. Every frame is distinct (each rank its own steps,
   noisy loss and norms, deep statistics every 10th step), encoded before the
   clock starts. The rate is summaries / (time from the first frame sent until
   the last one is applied: each rank's connection ends with a GOODBYE and an
   EOF, and the sidecar closes it once it has applied everything before). Nothing
   scrapes or polls the sidecar while it ingests. Also shown: the sidecar's own CPU
   seconds per summary (from /proc). Each cell: min / median / max over
   ``--repeats`` runs (distinct jobs, distinct frames).
2. Render: connects 64 ranks with 4 param groups and deep statistics, then times 20
   GETs of /metrics (wall time seen by the client) and reports the median.

Targets: >= 50,000 summaries/s at 64 ranks and >= 30,000 at 1,024 ranks; render <= 25 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import selectors
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

TARGET_RATE = 50_000  # at 64 ranks
TARGET_RATE_1024 = 30_000  # at 1,024 ranks
ENCODINGS = ("packed", "json")
TARGET_RENDER_MS = 25.0
GROUPS = ["embeddings", "decay", "no_decay", "head"]


def _hello(job: str, rank: int, world_size: int = 64) -> dict:
    return {
        "job": job, "rank": rank, "world_size": world_size, "host": "bench", "pid": os.getpid(), "session": f"{job}-{rank}",
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


def _rank_frames(job: str, rank: int, steps: int, encoding: str) -> bytes:
    """``steps`` distinct STEP frames of one rank, as its trainer would send them."""
    rng = random.Random(f"{job}/{rank}")
    encode = wire.encode_step_packed if encoding == "packed" else (
        lambda p: wire.encode_frame(wire.MessageType.STEP, p))
    frames = []
    for step in range(1, steps + 1):
        payload = _step(step, step % 10 == 0)
        payload["time"] = 1.7e9 + rank * 1e-3 + step * 0.1 + rng.random() * 1e-3
        payload["duration_s"] = 0.1 + rng.random() * 1e-3
        payload["loss"] = 2.5 - 1e-4 * step + rng.gauss(0.0, 0.01)
        payload["grad_norm"] = 1.0 + rng.gauss(0.0, 0.02)
        payload["group_grad_norms"] = [0.5 * payload["grad_norm"] + rng.random() * 1e-3 for _ in GROUPS]
        frames.append(encode(payload))
    # GOODBYE last: once the sidecar shows this rank finished, all its STEPs were applied
    frames.append(wire.encode_frame(wire.MessageType.GOODBYE, {"reason": "bench", "step": steps, "exit_reason": "clean"}))
    return b"".join(frames)


def _feed(endpoint: str, job: str, ranks: int, steps: int, encoding: str, core: int | None,
          ready, go, sent, done) -> None:
    """Feeder process: one connection per rank, HELLO, then that rank's STEPs as fast as the sockets take them."""
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except (AttributeError, OSError):
            pass
    data = [memoryview(_rank_frames(job, rank, steps, encoding)) for rank in range(ranks)]
    socks = []
    for rank in range(ranks):
        sock = _connect(endpoint)
        sock.sendall(wire.encode_frame(wire.MessageType.HELLO, _hello(job, rank, ranks)))
        socks.append(sock)
    ready.set()
    go.wait(120)
    selector = selectors.DefaultSelector()
    offsets = {}
    for sock, view in zip(socks, data):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_WRITE, view)
        offsets[sock] = 0
    open_socks = len(socks)
    while open_socks:
        for key, events in selector.select(timeout=5):
            sock, view = key.fileobj, key.data
            if sock in offsets:
                try:
                    offsets[sock] += sock.send(view[offsets[sock]:offsets[sock] + 65536])
                except BlockingIOError:
                    continue
                if offsets[sock] >= len(view):
                    # all sent: the sidecar closes its side once it has applied
                    # every frame before our EOF, which recv() then sees
                    del offsets[sock]
                    sock.shutdown(socket.SHUT_WR)
                    selector.modify(sock, selectors.EVENT_READ, view)
                continue
            try:
                if not sock.recv(65536):
                    selector.unregister(sock)
                    open_socks -= 1
            except BlockingIOError:
                pass
            except OSError:
                selector.unregister(sock)
                open_socks -= 1
    sent.set()
    done.wait(120)  # keep the connections open until the sidecar has read everything
    for s in socks:
        s.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _steps_total(text: str, job: str) -> float:
    pattern = re.compile(r'^adamwatch_steps_total\{job="' + re.escape(job) + r'",rank="\d+"\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


def _start_sidecar(endpoint: str, core: int | None, config: str | None,
                   extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    proc = subprocess.Popen(
        [sys.executable, "-m", "adamwatch_sidecar.cli", "serve", "--listen", endpoint,
         "--metrics-address", "127.0.0.1:0", "--log-level", "INFO", *(["--config", config] if config else []),
         *extra],
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


def _ingest_once(endpoint: str, url: str, pid: int, job: str, ranks: int, steps: int, encoding: str,
                 feeder_core: int | None) -> tuple[float, float]:
    """One measured run: (summaries per second, sidecar CPU microseconds per summary)."""
    total = ranks * steps
    ctx = multiprocessing.get_context("spawn")
    ready, go, sent, done = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    feeder = ctx.Process(target=_feed, args=(endpoint, job, ranks, steps, encoding, feeder_core, ready, go, sent, done))
    feeder.start()
    try:
        if not ready.wait(120):
            raise SystemExit("the feeder did not start")
        # every HELLO applied before the clock starts (a scrape here is outside the measurement)
        deadline = time.monotonic() + 60
        while _hellos(_scrape(url), job) < ranks:
            if time.monotonic() > deadline:
                raise SystemExit(f"the sidecar did not admit {ranks} ranks")
            time.sleep(0.05)
        cpu0 = _cpu_seconds(pid)
        t0 = time.perf_counter()
        go.set()
        # the feeder says when the sidecar has closed every connection (after applying all its frames)
        if not sent.wait(300):
            raise SystemExit("the sidecar did not take every frame within 300 s")
        elapsed = time.perf_counter() - t0
        cpu = _cpu_seconds(pid) - cpu0
        seen = _steps_total(_scrape(url), job)  # outside the measurement: check nothing was lost
        if seen != total or _finished(url, job) != ranks:
            raise SystemExit(f"{seen:.0f} of {total} summaries were counted")
    finally:
        done.set()
        feeder.join(30)
        if feeder.is_alive():
            feeder.kill()
    return total / elapsed, cpu / total * 1e6


def _finished(url: str, job: str) -> int:
    """Ranks of ``job`` whose GOODBYE (their last frame) the sidecar has applied."""
    with urllib.request.urlopen(f"{url}/api/v1/trainers?job={job}&rank=0", timeout=10) as resp:
        listing = json.load(resp)
    return sum(1 for t in listing["trainers"] if t.get("job") == job and t.get("finished"))


def _hellos(text: str, job: str) -> int:
    return len(re.findall(r'^adamwatch_trainer_connected\{job="' + re.escape(job) + r'",rank="\d+"\} 1', text, re.M))


def _render(endpoint: str, url: str, ranks: int, scrapes: int) -> tuple[float, int, int]:
    """64 ranks, 4 param groups, deep statistics: median /metrics wall time (ms), lines, bytes."""
    socks = []
    for rank in range(ranks):
        s = _connect(endpoint)
        s.sendall(wire.encode_frame(wire.MessageType.HELLO, _hello("render", rank))
                  + wire.encode_frame(wire.MessageType.STEP, _step(10, True)))
        socks.append(s)
    deadline = time.monotonic() + 30
    while _steps_total(_scrape(url), "render") < ranks and time.monotonic() < deadline:
        time.sleep(0.05)
    times, size, lines = [], 0, 0
    for _ in range(scrapes):
        start = time.perf_counter()
        text = _scrape(url)
        times.append(time.perf_counter() - start)
        size, lines = len(text), text.count("\n")
    for s in socks:
        s.close()
    return statistics.median(times) * 1000, lines, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summaries", type=int, default=60_000, help="STEP frames per run (split over the ranks)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024], help="rank counts to measure")
    parser.add_argument("--encodings", nargs="+", choices=ENCODINGS, default=list(ENCODINGS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (min/median/max)")
    parser.add_argument("--render-ranks", type=int, default=64, help="ranks connected for the render measurement")
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--config", help="sidecar config file (e.g. to compare with remediation disabled)")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    sidecar_core = cores[-1] if cores else None
    feeder_core = cores[0] if len(cores) > 1 else None
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    render = None
    for encoding in args.encodings:
        for ranks in args.ranks:
            folder = tempfile.mkdtemp(prefix="aw-bench-", dir="/tmp")
            endpoint = f"unix://{folder}/adamwatch.sock"
            proc, url = _start_sidecar(endpoint, sidecar_core, args.config,
                                       ("--max-trainers", str(ranks * (args.repeats + 1) + 64),
                                        "--retention-seconds", "60"))
            try:
                steps = max(1, args.summaries // ranks)
                results[(encoding, ranks)] = [
                    _ingest_once(endpoint, url, proc.pid, f"ingest-{encoding}-{ranks}-{r}", ranks, steps, encoding,
                                 feeder_core)
                    for r in range(args.repeats)]
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                shutil.rmtree(folder, ignore_errors=True)

    folder = tempfile.mkdtemp(prefix="aw-bench-", dir="/tmp")
    endpoint = f"unix://{folder}/adamwatch.sock"
    proc, url = _start_sidecar(endpoint, sidecar_core, args.config)
    try:  # a fresh sidecar: only the render ranks
        render = _render(endpoint, url, args.render_ranks, args.scrapes)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)

    print(f"config: {args.config or 'defaults (remediation as shipped)'}; load average {os.getloadavg()[0]:.1f}")
    pinned = f"pinned to core {sidecar_core}" if sidecar_core is not None else "not pinned"
    print(f"sidecar {pinned}; feeder in a separate process, one connection per rank"
          + (f", on core {feeder_core}" if feeder_core is not None else ""))
    print(f"ingest, summaries/s (min / median / max of {args.repeats}), ~{args.summaries:,} distinct summaries per run; "
          "sidecar CPU us/summary (median):")
    print(f"  {'encoding':<9}{'ranks':>6}  {'min':>9} {'median':>9} {'max':>9}  {'cpu us':>7}  target")
    medians = {}
    for (encoding, ranks), runs in results.items():
        rates = sorted(r for r, _ in runs)
        med = medians[(encoding, ranks)] = statistics.median(rates)
        cpu = statistics.median(c for _, c in runs)
        # the targets are the default encoding's; JSON is there for old trainers, as the comparison
        target = None if encoding != "packed" else TARGET_RATE if ranks <= 64 else TARGET_RATE_1024 if ranks >= 1024 else None
        verdict = "" if target is None else f">= {target:,} {'OK' if med >= target else 'BELOW'}"
        print(f"  {encoding:<9}{ranks:>6}  {rates[0]:>9,.0f} {med:>9,.0f} {rates[-1]:>9,.0f}  {cpu:>7.1f}  {verdict}")
    for ranks in args.ranks:
        if ("packed", ranks) in medians and ("json", ranks) in medians:
            print(f"  packed / json at {ranks} ranks: {medians[('packed', ranks)] / medians[('json', ranks)]:.2f}x")
    if render is not None:
        render_ms, lines, size = render
        print(f"/metrics with {args.render_ranks} ranks x {len(GROUPS)} param groups (deep statistics): "
              f"median {render_ms:.1f} ms over {args.scrapes} scrapes, {lines} lines, {size / 1024:.0f} KiB "
              f"(target <= {TARGET_RENDER_MS:.0f} ms) {'OK' if render_ms <= TARGET_RENDER_MS else 'ABOVE TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
