"""Cost of the deep statistics block (``StepStats.deep()``) alone: torch.sort against numpy's sort.

The deep block orders a coordinate sample to read its quantiles. On CUDA that is
one ``torch.sort``; on CPU, where torch's sort is slow, numpy sorts the rows in
place (vectorised where the CPU allows; same order, NaN last). This benchmark
times ``deep()`` both ways on the same optimizer state, alternating in rounds,
and prints the medians and their ratio, per model size:

    python benchmarks/deep_stats.py                 # demo, 2.7M, demo-6L x 64 groups; under a minute
    python benchmarks/deep_stats.py --rounds 3 --models demo

"Used" says which way ``deep()`` goes by default (numpy on CPU when it is installed).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from adamwatch.step_stats import StepStats  # noqa: E402
from demo import BATCH  # noqa: E402
from tiny_gpt import GPTConfig, TinyGPT  # noqa: E402
from trainer_overhead import MODELS, split_groups  # noqa: E402

SHAPES = {"demo": ("demo", 2), "2.7M": ("2.7M", 2), "64-groups": ("demo-6L", 64)}


def trained_stats(model_name: str, groups: int) -> StepStats:
    cfg = GPTConfig(**MODELS[model_name])
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(split_groups(model, groups), lr=3e-4)
    x = torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size))
    for _ in range(2):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    stats = StepStats(opt)
    stats.deep()  # builds the plan
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per way (median over them)")
    parser.add_argument("--calls", type=int, default=10, help="deep() calls per round")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch={torch.__version__} threads=1 rounds={args.rounds} calls={args.calls}")
    print(f"{'shape':10s} {'sample rows':>12s} {'torch.sort ms':>14s} {'numpy sort ms':>14s} {'ratio':>6s}  used")
    for label in args.models:
        stats = trained_stats(*SHAPES[label])
        plan = stats._deep_plan
        default = plan.numpy_sort
        times: dict[str, list[float]] = {"torch": [], "numpy": []}
        for r in range(args.rounds):
            for way in (("torch", "numpy") if r % 2 else ("numpy", "torch")):
                plan.numpy_sort = way == "numpy"
                start = time.thread_time()
                for _ in range(args.calls):
                    stats.deep()
                times[way].append((time.thread_time() - start) / args.calls * 1e3)
        plan.numpy_sort = default
        by_torch, by_numpy = statistics.median(times["torch"]), statistics.median(times["numpy"])
        rows = "x".join(map(str, plan.padded_shape))
        print(f"{label:10s} {rows:>12s} {by_torch:14.2f} {by_numpy:14.2f} {by_numpy / by_torch:6.2f}  "
              f"{'numpy' if default else 'torch'}")


if __name__ == "__main__":
    main()
