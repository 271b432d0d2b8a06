"""Trainer overhead of adamwatch, and of what people write by hand, side by side in one run.

Every arm trains its own copy of the same model (same initial weights, same
batches). The arms take turns in blocks of consecutive steps (a block is the
deep-statistics period, so every block of the deep arm holds exactly one deep
step), the order rotating from one round to the next; drift on the machine
(other load, thermals) then lands on every arm alike. What a user pays is
throughput, so the statistic is the ratio of SUMMED step times, arm over bare,
not a median of per-step ratios (which would hide the periodic deep step).
The rounds are split into repeats; each repeat gives one ratio and the table
shows min / median / max over repeats and the added milliseconds per step.
Besides wall time it reports the training thread's CPU time (``thread_time``)
the same way: on a machine shared with other work, preemption inflates wall
time at random, the thread's own CPU time much less. The client threads' CPU
(decoding, encoding, sending) is printed separately.

Arms:

| arm | what the step does besides forward, backward, AdamW |
| --- | --- |
| bare | nothing |
| bare, second copy | nothing, on a second copy of the model: its ratio to bare is the run's resolution |
| naive logger | ``loss.item()``, ``get_total_norm(grads).item()``, ``math.isfinite`` on both |
| clipping | ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` |
| adamwatch | ``observe_loss(loss)``, hooks: per-step summaries and, as by default, the replica fingerprint every 100 steps (no deep statistics) |
| adamwatch + clipping | the two above |
| adamwatch, deep every N | per-step summaries, Adam-state statistics every N steps (on the CPU on a helper thread) |
| adamwatch, deep every N, in the hook | the same, computed in the post-step hook (``deep_stats_thread=False``; CPU runs) |
| adamwatch + fingerprint every K | per-step summaries and the replica fingerprint every K steps (at the default K = 100, the adamwatch arm's own configuration: a second reading of it) |

The adamwatch arms stream to one real ``adamwatch-sidecar`` process; at the end
the benchmark reads its ``/metrics`` and checks that it received every step of
every watched arm.

    python benchmarks/trainer_overhead.py                       # demo model, about a minute
    python benchmarks/trainer_overhead.py --model 2.7M
    python benchmarks/trainer_overhead.py --model 25M --core --rounds 4 --repeats 3  # the 4 arms of the targets
    python benchmarks/trainer_overhead.py --model demo-6L --groups 64
    python benchmarks/trainer_overhead.py --device cuda

Budgets on the 2-core CI CPU (sum-ratios): per-step <= 1.02, deep every 10 <= 1.03.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import adamwatch  # noqa: E402
from demo import BATCH, free_port, sidecar_command, wait_ready  # noqa: E402  (the demo's helpers)
from tiny_gpt import ArithmeticCorpus, GPTConfig, TinyGPT  # noqa: E402

# Model sizes: the demo's model and two bigger TinyGPTs (parameter counts printed at start).
MODELS = {
    "demo": dict(n_layer=2, n_embd=64),
    # the demo's width with 6 layers: 75 parameter tensors, enough for --groups 64
    "demo-6L": dict(n_layer=6, n_embd=64),
    "2.7M": dict(n_layer=3, n_embd=272),
    "25M": dict(n_layer=8, n_embd=512),
}


def start_sidecar(workdir: str) -> tuple[subprocess.Popen, str, str]:
    """A real sidecar on a Unix socket, started and awaited the way the demo does it."""
    sock = os.path.join(workdir, "aw.sock")
    port = free_port(0)
    proc = subprocess.Popen(
        sidecar_command() + ["serve", "--listen", f"unix://{sock}", "--metrics-address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, f"unix://{sock}", f"http://127.0.0.1:{port}/metrics"


def split_groups(model: torch.nn.Module, groups: int) -> list[dict]:
    """The model's parameters dealt round-robin into ``groups`` param groups
    (the demo's two named groups when ``groups`` is 2)."""
    if groups == 2:
        return model.param_groups()
    params = list(model.parameters())
    if groups > len(params):
        raise SystemExit(f"--groups {groups}: the model has only {len(params)} parameter tensors "
                         f"(use --model demo-6L or bigger)")
    return [{"params": params[i::groups], "name": f"g{i}"} for i in range(groups)]


def make(cfg: GPTConfig, device: str = "cpu", *, groups: int = 2, impl: str = "default",
         ) -> tuple[TinyGPT, torch.optim.Optimizer]:
    """One copy of the model and its AdamW, from the same seed: every arm of every benchmark starts alike.
    ``impl``: torch's default implementation (for-loop on CPU), "foreach" or "fused"."""
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device)
    extra = {"fused": True} if impl == "fused" else {"foreach": True} if impl == "foreach" else {}
    return model, torch.optim.AdamW(split_groups(model, groups), lr=3e-4, **extra)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               monitor=None, *, clip: bool = False, before_update=None, after_backward=None) -> None:
    """One training step as a user writes it: forward, backward, (observe_loss), (clip), update.
    ``after_backward()`` is called right after backward (benchmarks/step_sections.py's timestamp)."""
    loss = model(x, y)
    loss.backward()
    if after_backward is not None:
        after_backward()
    if monitor is not None:
        monitor.observe_loss(loss)
    if before_update is not None:
        before_update(loss)
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


class Arm:
    """One copy of the model and optimizer, and what its step does besides training."""

    def __init__(self, name: str, cfg: GPTConfig, args, *, clip: bool = False, naive: bool = False,
                 watch: dict | None = None):
        self.name = name
        self.clip = clip
        self.naive = naive
        self.watch = watch
        self.model, self.opt = make(cfg, args.device, groups=args.groups, impl=args.impl)
        self.params = list(self.model.parameters())
        self.monitor = None
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # the training thread's CPU time: what other processes' load cannot inflate
        self.steps = 0
        self.sink = 0.0  # keeps the naive logger's values alive

    def start(self, endpoint: str, job: str) -> None:
        if self.watch is not None:
            self.monitor = adamwatch.watch(self.opt, endpoint=endpoint, job=job, **self.watch)

    def step(self, x: torch.Tensor, y: torch.Tensor, after_backward=None) -> None:
        train_step(self.model, self.opt, x, y, self.monitor, clip=self.clip,
                   before_update=self._log_naively if self.naive else None, after_backward=after_backward)

    def _log_naively(self, loss: torch.Tensor) -> None:
        value = loss.item()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).item()
        self.sink += math.isfinite(value) + math.isfinite(norm)


def steps_received(metrics_url: str) -> dict[str, float]:
    """``adamwatch_steps_total`` per job, as the sidecar exports it."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("adamwatch_steps_total{"):
            job = re.search(r'job="([^"]*)"', line).group(1)
            out[job] = out.get(job, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def build_arms(cfg: GPTConfig, args) -> list[Arm]:
    every = args.block
    arms = [
        Arm("bare", cfg, args),
        # Exactly bare, on its own copy of the model: what this run reads for an arm
        # that adds nothing, so its distance from 1 is the run's resolution.
        Arm("bare, second copy", cfg, args),
        Arm("naive logger", cfg, args, naive=True),
        Arm("clipping", cfg, args, clip=True),
        Arm("adamwatch", cfg, args, watch=dict(deep_stats_every=0)),
        Arm("adamwatch + clipping", cfg, args, clip=True, watch=dict(deep_stats_every=0)),
        Arm(f"adamwatch, deep every {every}", cfg, args, watch=dict(deep_stats_every=every)),
    ]
    if args.device == "cpu":
        # The same, with the block computed in the post-step hook (deep_stats_thread=False):
        # what the helper thread takes off the training thread, side by side.
        arms.append(Arm(f"adamwatch, deep every {every}, in the hook", cfg, args,
                        watch=dict(deep_stats_every=every, deep_stats_thread=False)))
    if args.fingerprint_every:
        arms.append(Arm(f"adamwatch + fingerprint every {args.fingerprint_every}", cfg, args,
                        watch=dict(deep_stats_every=0, fingerprint_every=args.fingerprint_every)))
    if args.core:
        core = ("bare", "bare, second copy", "adamwatch", f"adamwatch, deep every {every}")
        arms = [arm for arm in arms if arm.name in core]
    return arms


def run(args) -> int:
    cfg = GPTConfig(block_size=64, **MODELS[args.model])
    corpus = ArithmeticCorpus(cfg.block_size, seed=1)
    arms = build_arms(cfg, args)
    if args.rounds is None:
        args.rounds = len(arms)  # every arm in every position once per repeat
    n_params = sum(p.numel() for p in arms[0].params)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"model={args.model} ({n_params / 1e6:.2f}M params, {len(arms[0].opt.param_groups)} param groups) "
          f"AdamW impl={args.impl} batch={args.batch} block={args.block} steps "
          f"rounds={args.rounds} repeats={args.repeats}")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    workdir = tempfile.mkdtemp(prefix="aw-bench-")
    sidecar, endpoint, metrics_url = start_sidecar(workdir)
    run_id = os.getpid()
    try:
        for i, arm in enumerate(arms):
            arm.start(endpoint, f"bench-{run_id}-{i}")
        # per repeat, per arm: summed wall seconds and training-thread CPU seconds
        sums = [[0.0] * len(arms) for _ in range(args.repeats)]
        cpu_sums = [[0.0] * len(arms) for _ in range(args.repeats)]
        process_cpu = time.process_time()
        thread_cpu = time.thread_time()
        loop_start = time.perf_counter()
        total_rounds = args.warmup_rounds + args.rounds * args.repeats
        for r in range(total_rounds):
            batches = [tuple(t.to(args.device) for t in corpus.batch(args.batch)) for _ in range(args.block)]
            # Cyclic rotation: over len(arms) consecutive rounds every arm runs
            # once in every position (first after the batches are made, after
            # each other arm, ...), so position effects cancel within a repeat.
            shift = r % len(arms)
            order = list(range(len(arms)))[shift:] + list(range(len(arms)))[:shift]
            for a in order:
                arm = arms[a]
                sync()
                start, cpu_start = time.perf_counter(), time.thread_time()
                for x, y in batches:
                    arm.step(x, y)
                sync()  # timing only: the monitor itself never syncs
                elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
                if r >= args.warmup_rounds:
                    sums[(r - args.warmup_rounds) // args.rounds][a] += elapsed
                    cpu_sums[(r - args.warmup_rounds) // args.rounds][a] += cpu
                    arm.steps += len(batches)
                    arm.seconds += elapsed
                    arm.cpu_seconds += cpu
        # CPU of every thread but this one, over the timed loop (warm-up included)
        other_cpu = (time.process_time() - process_cpu) - (time.thread_time() - thread_cpu)
        loop_seconds = time.perf_counter() - loop_start
        all_watched_steps = sum(args.block * total_rounds for arm in arms if arm.monitor is not None)
        helper = {}  # arm -> (CPU seconds, jobs) of its helper thread: deep blocks, fingerprints (CPU runs)
        for arm in arms:
            if arm.monitor is not None:
                arm.monitor.close()
                job = arm.monitor._deep_job
                if job is not None and job.jobs:
                    helper[arm.name] = (job.cpu_seconds, job.jobs)
        # Every step of every watched arm must have reached the sidecar.
        expected = args.block * total_rounds
        deadline = time.monotonic() + 20
        while True:
            received = steps_received(metrics_url)
            missing = {arm.name: received.get(f"bench-{run_id}-{i}", 0.0)
                       for i, arm in enumerate(arms) if arm.monitor is not None
                       and received.get(f"bench-{run_id}-{i}", 0.0) != expected}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    bare_ms = 1000 * arms[0].seconds / arms[0].steps
    print(f"\nbare step: {bare_ms:.2f} ms wall, {1000 * arms[0].cpu_seconds / arms[0].steps:.2f} ms CPU "
          f"(mean over {arms[0].steps} steps)")
    print(f"{'arm':<36} {'wall sum-ratio min / median / max':>34} {'added ms/step':>14}"
          f" {'thread-CPU sum-ratio min / median / max':>40} {'added CPU ms':>12}")
    results = {}
    for a, arm in enumerate(arms):
        ratios = [rep[a] / rep[0] for rep in sums]
        cpu_ratios = [rep[a] / rep[0] for rep in cpu_sums]
        added = 1000 * (arm.seconds - arms[0].seconds) / arm.steps
        added_cpu = 1000 * (arm.cpu_seconds - arms[0].cpu_seconds) / arm.steps
        results[arm.name] = statistics.median(ratios)
        print(f"{arm.name:<36} {min(ratios):>14.4f} / {statistics.median(ratios):.4f} / {max(ratios):.4f} "
              f"{added:>+13.2f} {min(cpu_ratios):>20.4f} / {statistics.median(cpu_ratios):.4f} / "
              f"{max(cpu_ratios):.4f} {added_cpu:>+12.2f}")
    # The client threads sleep while their arm is idle (benchmarks/client_cpu.py measures one alone).
    monitors = sum(1 for arm in arms if arm.monitor is not None)
    helper_cpu = sum(cpu for cpu, _ in helper.values())
    client_cpu = other_cpu - helper_cpu
    print(f"CPU of the process's other threads: the {monitors} watched arms' client threads "
          f"{1000 * client_cpu / loop_seconds / monitors:.2f} ms per second per monitor, "
          f"{1000 * client_cpu / max(1, all_watched_steps):.3f} ms per watched step")
    for name, (cpu, jobs) in helper.items():
        # On the CPU the deep block and the fingerprint run on a helper thread (adamwatch.background)
        # while the next forward and backward run: off the training thread's wall time, not free CPU.
        arm = next(a for a in arms if a.name == name)
        per_step = 1000 * cpu / (args.block * total_rounds)  # every step the arm ran, warm-up included
        total = 1000 * (arm.cpu_seconds - arms[0].cpu_seconds) / arm.steps + per_step
        print(f"{name}: helper thread (deep block, fingerprint) {1000 * cpu / jobs:.2f} ms of CPU per job, "
              f"{jobs} jobs, {per_step:.3f} ms per step; training thread + helper: {total:+.2f} CPU ms per step "
              f"over bare")
    print(f"\nsidecar received every step of every watched arm ({expected} each): "
          f"{'yes' if not missing else 'NO, got ' + repr(missing)}")
    twin = results["bare, second copy"]
    print(f"resolution of this run: bare's second copy reads {twin:.4f} (median); differences between arms "
          f"smaller than {abs(twin - 1):.4f} are not resolved by this run")
    per_step = results["adamwatch"]
    deep = results[f"adamwatch, deep every {args.block}"]
    print(f"budget (medians): per-step <= 1.02 -> {'OK' if per_step <= 1.02 else 'OVER'}; "
          f"deep every {args.block} <= 1.03 -> {'OK' if deep <= 1.03 else 'OVER'} "
          f"(<= 1.02 -> {'OK' if deep <= 1.02 else 'OVER'})"
          + (f"; adamwatch <= naive logger -> {'OK' if per_step <= results['naive logger'] else 'OVER'}"
             if "naive logger" in results else ""))
    return 0 if not missing else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--groups", type=int, default=2, help="param groups, 1..64 (2: the demo's decay/no_decay)")
    parser.add_argument("--impl", choices=("default", "foreach", "fused"), default="default",
                        help="AdamW implementation (default: torch's choice, for-loop on CPU)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--block", type=int, default=10, help="consecutive steps per arm (= deep-stats period)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per repeat, each arm one block per round (default: the number of arms, "
                             "so every arm takes every position once per repeat)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--fingerprint-every", type=int, default=100,
                        help="arm with the replica fingerprint every K steps (0: no such arm)")
    parser.add_argument("--core", action="store_true",
                        help="only the arms the per-step and deep-statistics targets name (bare, its second copy, "
                             "adamwatch, deep every N): for the 25M model, where every arm would take hours here")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads (default: all cores but one, which the sidecar process uses; "
                             "in Kubernetes it has its own CPU request)")
    args = parser.parse_args(argv)
    if not 1 <= args.groups <= 64:
        parser.error(f"--groups must be in 1..64, got {args.groups}")
    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
