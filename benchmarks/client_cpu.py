"""CPU of the trainer's client thread (the thread that turns summaries into frames and sends them).

The client thread shares the interpreter with the training loop: every
wake-up and every summary it encodes is CPU (and GIL hand-offs) the training
thread does not get. This benchmark trains the demo model against one real
``adamwatch-sidecar`` process and reads the client thread's own CPU clock
(``time.pthread_getcpuclockid``, nanoseconds) around the timed steps:

- CPU per step and loop turns per step, per-step summaries and deep statistics every 10;
- turns during an idle second after training (the client must not tick).

    python benchmarks/client_cpu.py              # demo model, about a minute
    python benchmarks/client_cpu.py --steps 2000 --repeats 5

Target (issue 15): <= 0.1 ms of client CPU per step on the demo model.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import adamwatch  # noqa: E402
from tiny_gpt import ArithmeticCorpus, GPTConfig, TinyGPT  # noqa: E402
from trainer_overhead import start_sidecar  # noqa: E402  (a real sidecar, started as the demo does)


def client_cpu_seconds(monitor: adamwatch.Monitor) -> float:
    """The client thread's own CPU time so far (read from another thread)."""
    thread = monitor._client._thread
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def one_run(endpoint: str, job: str, steps: int, deep_every: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=64)  # the demo's model
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    corpus = ArithmeticCorpus(cfg.block_size, seed=1)
    monitor = adamwatch.watch(opt, endpoint=endpoint, job=job, deep_stats_every=deep_every)

    def train(n: int) -> None:
        for _ in range(n):
            x, y = corpus.batch(16)
            loss = model(x, y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        train(20)  # warm-up: connected, step time known, batching chosen
        time.sleep(0.5)
        cpu0, turns0, wall0 = client_cpu_seconds(monitor), monitor._client.turns, time.perf_counter()
        train(steps)
        wall = time.perf_counter() - wall0
        time.sleep(0.3)  # the last batch goes out
        cpu, turns = client_cpu_seconds(monitor) - cpu0, monitor._client.turns - turns0
        idle_turns0 = monitor._client.turns
        time.sleep(1.0)
        idle_turns = monitor._client.turns - idle_turns0
    finally:
        monitor.close()
    return {"cpu_ms_per_step": 1000 * cpu / steps, "turns_per_step": turns / steps,
            "step_ms": 1000 * wall / steps, "idle_turns_per_s": float(idle_turns)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the other core is the sidecar's
    workdir = tempfile.mkdtemp(prefix="aw-client-")
    sidecar, endpoint, _ = start_sidecar(workdir)
    try:
        print(f"torch={torch.__version__} threads=1 model=demo steps={args.steps} repeats={args.repeats}")
        print(f"{'summaries':<24} {'client CPU ms/step min / median / max':>38} {'turns/step':>11} "
              f"{'step ms':>8} {'idle turns/s':>13}")
        for label, deep in (("per-step", 0), ("deep every 10", 10)):
            runs = [one_run(endpoint, f"client-{deep}-{r}", args.steps, deep) for r in range(args.repeats)]
            cpu = [r["cpu_ms_per_step"] for r in runs]
            print(f"{label:<24} {min(cpu):>20.3f} / {statistics.median(cpu):.3f} / {max(cpu):.3f} "
                  f"{statistics.median(r['turns_per_step'] for r in runs):>11.2f} "
                  f"{statistics.median(r['step_ms'] for r in runs):>8.2f} "
                  f"{max(r['idle_turns_per_s'] for r in runs):>13.0f}")
        print("target: <= 0.1 ms client CPU per step; 0 turns while idle")
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
