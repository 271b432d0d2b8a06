"""Clipping and adamwatch side by side: do they share their pass over the gradients?

Four copies of the demo model train interleaved in one process (the order rotates
every iteration, so drift hits every arm alike): bare, ``clip_grad_norm_`` alone,
adamwatch alone, adamwatch with ``clip_grad_norm_``. Each arm's median time per
step is divided by the bare arm's, pairing steps of the same iteration. The
watched arms stream to a real ``adamwatch-sidecar`` process.

    python benchmarks/clip_overhead.py              # CPU, about a minute

Target (issue 8): adamwatch with clipping <= clipping alone + 0.005 — the clip's
norm is the one pass over the gradients both need (adamwatch.grad_clip).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adamwatch  # noqa: E402
from trainer_overhead import BATCH, MODELS, ArithmeticCorpus, GPTConfig, make, start_sidecar, train_step  # noqa: E402

ARMS = ("bare", "clip", "adamwatch", "adamwatch+clip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(**MODELS["demo"])
    corpus = ArithmeticCorpus(cfg.block_size, seed=1)
    workdir = tempfile.mkdtemp(prefix="aw-bench-")
    sidecar, endpoint, _ = start_sidecar(workdir)
    try:
        arms = {name: make(cfg, impl="fused" if args.fused else "default") for name in ARMS}
        monitors = {name: adamwatch.watch(arms[name][1], endpoint=endpoint, job=f"clip-{i}", deep_stats_every=0)
                    for i, name in enumerate(ARMS) if name.startswith("adamwatch")}
        ratios: dict[str, list[float]] = {name: [] for name in ARMS[1:]}
        for i in range(args.iterations + args.warmup):
            x, y = corpus.batch(BATCH)
            times = {}
            order = ARMS[i % 4:] + ARMS[:i % 4]
            for name in order:
                model, opt = arms[name]
                start = time.perf_counter()
                train_step(model, opt, x, y, monitors.get(name), clip=name.endswith("clip"))
                times[name] = time.perf_counter() - start
            if i >= args.warmup:
                for name in ARMS[1:]:
                    ratios[name].append(times[name] / times["bare"])
        for monitor in monitors.values():
            monitor.close()
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} fused={args.fused} "
          f"iterations={args.iterations}")
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    for name, median in medians.items():
        print(f"{name:<16} median ratio to bare {median:.4f}")
    extra = medians["adamwatch+clip"] - medians["clip"]
    print(f"adamwatch on top of clipping: +{extra:.4f} (target <= 0.005: {'OK' if extra <= 0.005 else 'OVER'}); "
          f"adamwatch alone: +{medians['adamwatch'] - 1:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
