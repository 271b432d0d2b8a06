"""Trainer overhead of adamwatch: bare and watched steps interleaved in one process.

Two identical copies of the demo model train side by side; each pair of steps
(one bare, one watched, order alternating) gives a ratio watched/bare, and the
median of those ratios is the overhead. Interleaving cancels drift (thermal,
other load) that separate runs would mix into the result. The watched copy
streams to a real ``adamwatch-sidecar`` process.

    python benchmarks/trainer_overhead.py            # CPU, about a minute
    python benchmarks/trainer_overhead.py --device cuda

Budgets on the 2-core CI CPU: per-step summaries <= 1.02; with deep statistics
every 10 steps <= 1.03.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import adamwatch  # noqa: E402
from demo import BATCH, MODEL, free_port, sidecar_command, wait_ready  # noqa: E402  (the demo's model)
from tiny_gpt import ArithmeticCorpus, GPTConfig, TinyGPT  # noqa: E402


def start_sidecar(workdir: str) -> tuple[subprocess.Popen, str]:
    """A real sidecar on a Unix socket, started and awaited the way the demo does it."""
    sock = os.path.join(workdir, "aw.sock")
    port = free_port(0)
    proc = subprocess.Popen(
        sidecar_command() + ["serve", "--listen", f"unix://{sock}", "--metrics-address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, f"unix://{sock}"


def make(cfg: GPTConfig, device: str, fused: bool) -> tuple[TinyGPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device)
    opt = torch.optim.AdamW(model.param_groups(), lr=3e-4, fused=fused or None)  # torch's default: for-loop on CPU
    return model, opt


def train_step(model, opt, x, y, monitor=None) -> None:
    loss = model(x, y)
    loss.backward()
    if monitor is not None:
        monitor.observe_loss(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(label: str, deep_every: int, pairs: int, args, endpoint: str) -> float:
    cfg = GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=MODEL.block_size)
    corpus = ArithmeticCorpus(cfg.block_size, seed=1)
    bare_model, bare_opt = make(cfg, args.device, args.fused)
    model, opt = make(cfg, args.device, args.fused)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    ratios = []
    with adamwatch.watch(opt, endpoint=endpoint, job=f"bench-{label}", deep_stats_every=deep_every) as monitor:
        for i in range(pairs + args.warmup):
            x, y = (t.to(args.device) for t in corpus.batch(args.batch))
            times = {}
            order = (("bare", bare_model, bare_opt, None), ("watched", model, opt, monitor))
            for name, m, o, mon in order if i % 2 == 0 else reversed(order):
                sync()
                start = time.perf_counter()
                train_step(m, o, x, y, mon)
                sync()  # timing only: the monitor itself never syncs
                times[name] = time.perf_counter() - start
            if i >= args.warmup:
                ratios.append(times["watched"] / times["bare"])
        dropped = monitor.dropped_total
    median = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"{label:<34} median ratio {median:.4f}  (IQR {q1:.3f}-{q3:.3f}, {len(ratios)} pairs, dropped {dropped})")
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=700)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--layers", type=int, default=MODEL.n_layer)
    parser.add_argument("--width", type=int, default=MODEL.n_embd)
    parser.add_argument("--fused", action="store_true", help="fused AdamW (default: torch's default implementation)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads (default: all cores but one, which the sidecar process uses; "
                             "in Kubernetes it has its own CPU request)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    workdir = tempfile.mkdtemp(prefix="aw-bench-")
    sidecar, endpoint = start_sidecar(workdir)
    try:
        print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"model=TinyGPT(layers={args.layers}, width={args.width}) batch={args.batch}")
        per_step = measure("per-step summaries", 0, args.pairs, args, endpoint)
        deep = measure("with deep statistics every 10", 10, args.pairs, args, endpoint)
        print(f"budget: per-step <= 1.02 -> {'OK' if per_step <= 1.02 else 'OVER'}; "
              f"deep every 10 <= 1.03 -> {'OK' if deep <= 1.03 else 'OVER'}")
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
