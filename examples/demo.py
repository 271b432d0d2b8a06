"""The adamwatch demo: a real sidecar process and a small GPT training on CPU.

    bash scripts/demo.sh                 # set-up, then this script (about a minute)
    python examples/demo.py --seconds 30 --metrics-port 9400

It starts ``adamwatch-sidecar`` on a Unix socket, trains TinyGPT with a watched
AdamW, prints the /metrics URL and, every few seconds, a live line read back
from that URL (so what you see is what Prometheus would scrape). Ctrl-C stops
both cleanly.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import adamwatch  # noqa: E402
from tiny_gpt import ArithmeticCorpus, GPTConfig, TinyGPT, warmup_cosine  # noqa: E402


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def sidecar_command() -> list[str]:
    exe = shutil.which("adamwatch-sidecar", path=os.path.dirname(sys.executable)) or shutil.which("adamwatch-sidecar")
    return [exe] if exe else [sys.executable, "-m", "adamwatch_sidecar.cli"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"adamwatch-sidecar exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"adamwatch-sidecar not ready at {url} after {timeout}s")


def read_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Parse an exposition into {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def live_line(metrics_url: str, job: str) -> str:
    m = read_metrics(metrics_url)

    def get(name: str, **labels: str) -> float | None:
        labels = {"job": job, "rank": "0", **labels}
        return m.get((name, tuple(sorted(labels.items()))))

    step, loss = get("adamwatch_optimizer_step"), get("adamwatch_loss")
    norm, lr = get("adamwatch_grad_norm", param_group="all"), get("adamwatch_learning_rate", param_group="decay")
    dropped = get("adamwatch_dropped_summaries_total") or 0
    if step is None:
        return "waiting for the first step ..."
    return (f"step {int(step):>5}  loss {loss:7.4f}  grad_norm {norm:7.4f}  lr {lr:.2e}"
            f"  dropped {int(dropped)}   (read from /metrics)")


def train(args: argparse.Namespace, endpoint: str, stop: threading.Event) -> dict:
    torch.manual_seed(args.seed)
    cfg = GPTConfig()
    model = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(model.param_groups(), lr=args.lr, fused=True)
    total_steps = args.max_steps
    scheduler = warmup_cosine(optimizer, warmup=50, total=total_steps)
    corpus = ArithmeticCorpus(cfg.block_size, seed=args.seed)
    started = time.monotonic()
    step = 0
    loss_value = float("nan")
    with adamwatch.watch(
        optimizer, scheduler=scheduler, endpoint=endpoint, job=args.job,
        samples_per_step=args.batch, tokens_per_step=args.batch * cfg.block_size,
    ) as monitor:
        while not stop.is_set() and step < total_steps and time.monotonic() - started < args.seconds:
            x, y = corpus.batch(args.batch)
            loss = model(x, y)
            loss.backward()
            monitor.observe_loss(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                loss_value = loss.item()  # the demo's own printout, not adamwatch
    return {"steps": step, "loss": loss_value, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="adamwatch demo: sidecar + TinyGPT on CPU")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--metrics-port", type=int, default=9400)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between live lines")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--job", default="demo-tinygpt")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="adamwatch-demo-")
    sock = os.path.join(workdir, "adamwatch.sock")
    port = free_port(args.metrics_port)
    sidecar = subprocess.Popen(
        sidecar_command() + ["serve", "--listen", f"unix://{sock}", "--metrics-address", f"127.0.0.1:{port}"],
        start_new_session=True,  # Ctrl-C reaches us; we stop the sidecar ourselves, in order
    )
    stop = threading.Event()
    printer: threading.Thread | None = None
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", sidecar)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        print(f"adamwatch demo: sidecar pid {sidecar.pid}, trainer socket unix://{sock}")
        print(f"adamwatch demo: metrics at {metrics_url}  (try: curl -s {metrics_url} | grep adamwatch_loss)")
        print(f"adamwatch demo: training TinyGPT on CPU for up to {args.seconds:.0f}s; Ctrl-C stops cleanly")

        def print_live() -> None:
            while not stop.wait(args.interval):
                try:
                    print(live_line(metrics_url, args.job), flush=True)
                except Exception as exc:  # the demo keeps going; say why a line is missing
                    print(f"(could not read {metrics_url}: {exc})", flush=True)

        printer = threading.Thread(target=print_live, daemon=True)
        printer.start()
        result = train(args, f"unix://{sock}", stop)
        stop.set()
        time.sleep(0.3)
        print(live_line(metrics_url, args.job))
        print(f"adamwatch demo: done, {result['steps']} steps in {result['seconds']:.1f}s, last loss {result['loss']:.4f}")
        return 0
    except KeyboardInterrupt:
        print("\nadamwatch demo: interrupted, stopping trainer and sidecar")
        return 130
    finally:
        stop.set()
        if printer is not None:
            printer.join(1)
        if sidecar.poll() is None:
            sidecar.send_signal(signal.SIGTERM)
            try:
                sidecar.wait(10)
            except subprocess.TimeoutExpired:
                sidecar.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
