"""Does the on-device spike guard prevent spikes, and what does it cost? One rerunnable benchmark.

A spike-prone configuration of the demo model (TinyGPT, fused AdamW at a high
constant learning rate, and injected bad batches: random tokens whose loss is
weighted x20, about one step in 40 after step 30, the same steps for every arm of
a seed) trains with each of

| arm | what |
| --- | --- |
| ``none`` | no guard |
| ``fixed_clip`` | ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` every step |
| ``clip`` | ``watch(spike_guard="clip")``: ZClip, z 2.5, EMA 0.97, warm-up 25 |
| ``skip`` | ``watch(spike_guard="skip")``: skip at mean + 6 sigma of the last 128 steps |

for three seeds, every run streaming to one real ``adamwatch-sidecar`` whose
remediation runs in dry-run mode. So spikes are counted by the sidecar's own
detectors (``adamwatch_detections_total``), and "remediations needed" is what its
ladder decided (``adamwatch_remediations_total{outcome="dry_run"}``: dry runs walk the
ladder exactly as real ones, without touching the trainer, so every arm sees the same
data). Final evaluation loss: the demo's held-out batches.

Cost: the guard's own work per step, as the median of paired step-time ratios on a
healthy run (same model and data, steps of the guarded and the unguarded copy
interleaved in alternating order, both watched and streaming), and the same for
fixed clipping.

    python benchmarks/spike_guard.py                 # about 2-3 minutes on 2 CPU cores
    python benchmarks/spike_guard.py --steps 200 --seeds 0 --pairs 100   # a quick look
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
from adamwatch_sidecar.remediation.detectors import SpikeDetector  # noqa: E402
from adamwatch_sidecar.remediation.policy import SpikeParams  # noqa: E402
from demo import BATCH, MODEL, evaluate, free_port, read_metrics, sidecar_command, wait_ready  # noqa: E402
from tiny_gpt import ArithmeticCorpus, TinyGPT  # noqa: E402

ARMS = ("none", "fixed_clip", "clip", "skip")
LR = 3e-3
BAD_EVERY = 40      # expected steps between injected bad batches
BAD_WEIGHT = 20.0   # a mis-weighted garbage batch
BAD_AFTER = 30


def start_sidecar(workdir: str) -> tuple[subprocess.Popen, str, str]:
    """A real sidecar with remediation in dry-run mode: it decides, it does not act."""
    sock = os.path.join(workdir, "aw.sock")
    config = os.path.join(workdir, "sidecar.yaml")
    with open(config, "w") as f:
        f.write("remediation:\n  dry_run: true\n")
    port = free_port(0)
    proc = subprocess.Popen(
        sidecar_command() + ["serve", "--config", config, "--listen", f"unix://{sock}",
                             "--metrics-address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/readyz", proc)
    return proc, f"unix://{sock}", f"{url}/metrics"


def guard_for(arm: str) -> str | None:
    return arm if arm in ("clip", "skip") else None


def bad_steps(seed: int, steps: int) -> set[int]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    draws = torch.rand(steps, generator=gen)
    return {i for i in range(BAD_AFTER, steps) if draws[i] < 1 / BAD_EVERY}


def train(arm: str, seed: int, steps: int, endpoint: str) -> dict:
    """One spike-prone run; returns eval loss and the mean step time."""
    torch.manual_seed(seed)
    model = TinyGPT(MODEL)
    opt = torch.optim.AdamW(model.param_groups(), lr=LR, fused=True)
    corpus = ArithmeticCorpus(MODEL.block_size, seed=seed)
    garbage = torch.Generator().manual_seed(20_000 + seed)
    bad = bad_steps(seed, steps)
    times = []
    # The sidecar's loss-spike detector, in process, on the clean batches only: a
    # spike there is damage that outlived the bad batch (the guard cannot hide it).
    follow_on = SpikeDetector("loss_spike", SpikeParams())
    spikes_after = 0
    with adamwatch.watch(opt, endpoint=endpoint, job=f"{arm}-s{seed}", deep_stats_every=0,
                         spike_guard=guard_for(arm)) as monitor:
        guard_s = time_guard(monitor)
        for i in range(steps):
            x, y = corpus.batch(BATCH)
            weight = 1.0
            if i in bad:
                x = torch.randint(0, MODEL.vocab_size, x.shape, generator=garbage)
                y = torch.randint(0, MODEL.vocab_size, y.shape, generator=garbage)
                weight = BAD_WEIGHT
            start = time.perf_counter()
            loss = model(x, y) * weight
            loss.backward()
            monitor.observe_loss(loss)
            if arm == "fixed_clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            if i not in bad:
                spikes_after += follow_on.observe(loss.item()) is not None  # outside the timed part
    return {"eval_loss": evaluate(model), "step_s": statistics.median(times), "bad": len(bad),
            "follow_on": spikes_after, "guard_s": statistics.median(guard_s) if guard_s else None}


def time_guard(monitor) -> list[float]:
    """Time the guard's own on_summary on every step (on a CPU its ops run as they are
    dispatched, so this is its whole cost): a low-noise companion to the paired ratio."""
    guard = monitor.spike_guard
    spent: list[float] = []
    if guard is None:
        return spent
    inner = guard.on_summary

    def timed(ctx) -> None:
        start = time.perf_counter()
        inner(ctx)
        spent.append(time.perf_counter() - start)

    guard.on_summary = timed
    return spent


def paired_ratio(arm: str, pairs: int, endpoint: str, warmup: int = 10) -> float:
    """Median step-time ratio guarded/unguarded on a healthy run, steps interleaved."""
    corpus = ArithmeticCorpus(MODEL.block_size, seed=1)
    copies = {}
    for name in ("base", arm):
        torch.manual_seed(0)
        model = TinyGPT(MODEL)
        opt = torch.optim.AdamW(model.param_groups(), lr=3e-4, fused=True)
        monitor = adamwatch.watch(opt, endpoint=endpoint, job=f"cost-{arm}-{name}", deep_stats_every=0,
                                  spike_guard=guard_for(arm) if name != "base" else None)
        copies[name] = (model, opt, monitor)
    ratios = []
    try:
        for i in range(pairs + warmup):
            x, y = corpus.batch(BATCH)
            elapsed = {}
            order = list(copies.items())
            for name, (model, opt, monitor) in (order if i % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                loss = model(x, y)
                loss.backward()
                monitor.observe_loss(loss)
                if name == "fixed_clip":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                elapsed[name] = time.perf_counter() - start
            if i >= warmup:
                ratios.append(elapsed[arm] / elapsed["base"])
    finally:
        for _, _, monitor in copies.values():
            monitor.close()
    return statistics.median(ratios)


def metric(values: dict, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for (n, lab), v in values.items():
        if n == name and set(labels.items()) <= set(lab):
            total += v
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=300, help="step pairs per cost measurement")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="aw-spike-guard-")
    sidecar, endpoint, metrics_url = start_sidecar(workdir)
    try:
        print(f"torch={torch.__version__} threads={torch.get_num_threads()} TinyGPT(width={MODEL.n_embd}) "
              f"batch={BATCH} fused AdamW lr={LR} steps={args.steps} seeds={args.seeds} "
              f"bad batches ~1/{BAD_EVERY} steps x{BAD_WEIGHT:g}")
        runs = {(arm, seed): train(arm, seed, args.steps, endpoint) for seed in args.seeds for arm in ARMS}
        time.sleep(1.0)  # the last frames reach the sidecar's detectors
        values = read_metrics(metrics_url)
        cost = {arm: paired_ratio(arm, args.pairs, endpoint) for arm in ARMS if arm != "none"}
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| arm | loss spikes | grad-norm spikes | guard streaks | remediations needed | guard activations "
          "| spikes on clean batches | final eval loss | step-time ratio vs no guard | guard's own work |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm in ARMS:
        per_seed = []
        for seed in args.seeds:
            job = f"{arm}-s{seed}"
            per_seed.append((
                metric(values, "adamwatch_detections_total", job=job, detector="loss_spike"),
                metric(values, "adamwatch_detections_total", job=job, detector="grad_norm_spike"),
                metric(values, "adamwatch_detections_total", job=job, detector="spike_guard"),
                metric(values, "adamwatch_remediations_total", job=job, outcome="dry_run"),
                metric(values, "adamwatch_spike_guard_activations_total", job=job),
                runs[(arm, seed)]["follow_on"],
                runs[(arm, seed)]["eval_loss"],
            ))
        cols = list(zip(*per_seed))

        def ints(col):
            return f"{int(sum(col))} ({'/'.join(str(int(v)) for v in col)})"

        evals = cols[6]
        ratio = "1 (reference)" if arm == "none" else f"{cost[arm]:.3f}"
        own = [runs[(arm, seed)]["guard_s"] for seed in args.seeds]
        steps_s = [runs[(arm, seed)]["step_s"] for seed in args.seeds]
        work = "—" if own[0] is None else (f"{statistics.median(own) * 1e6:.0f} µs/step "
                                            f"({statistics.median(own) / statistics.median(steps_s):.2%} of a step)")
        print(f"| {arm} | {ints(cols[0])} | {ints(cols[1])} | {ints(cols[2])} | {ints(cols[3])} | {ints(cols[4])} "
              f"| {ints(cols[5])} | {statistics.mean(evals):.3f} ({'/'.join(f'{v:.3f}' for v in evals)}) | {ratio} "
              f"| {work} |")
    print()
    bad = [runs[("none", seed)]["bad"] for seed in args.seeds]
    print("Counts: total over the seeds (per seed). Spikes and remediations as the sidecar's detectors and "
          "dry-run ladder counted them; steps the guard acted on are neutral for the spike detectors. "
          f"Injected bad batches: {sum(bad)} ({'/'.join(map(str, bad))}). Spikes on clean batches: the "
          "sidecar's loss-spike detector run in process over the losses of the other steps.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
