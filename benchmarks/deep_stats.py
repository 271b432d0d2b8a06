"""Cost of the deep statistics block (``StepStats.deep()``) alone, sort against CPU selection.

The deep block orders a coordinate sample to read its quantiles. On CUDA that is
one sort; on CPU, where torch's sort is slow, it selects only the ranks the
quantiles read (``numpy.partition``) when the rows are wide enough for that to
pay. This benchmark times ``deep()`` both ways on the same optimizer state,
alternating in rounds, and prints the medians and their ratio, per model size:

    python benchmarks/deep_stats.py                 # demo, 2.7M, demo-6L x 64 groups; under a minute
    python benchmarks/deep_stats.py --rounds 3 --models demo

"Used" says which way ``deep()`` goes by default for that shape.
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
    print(f"{'shape':10s} {'sample rows':>12s} {'ranks':>6s} {'sort ms':>8s} {'select ms':>10s} {'ratio':>6s}  used")
    for label in args.models:
        stats = trained_stats(*SHAPES[label])
        plan = stats._deep_plan
        default = plan.kth
        ranks = plan.ranks  # what the selection reads, whichever way is the default
        times: dict[str, list[float]] = {"sort": [], "select": []}
        for r in range(args.rounds):
            for way in (("sort", "select") if r % 2 else ("select", "sort")):
                plan.kth = ranks if way == "select" else None
                start = time.thread_time()
                for _ in range(args.calls):
                    stats.deep()
                times[way].append((time.thread_time() - start) / args.calls * 1e3)
        plan.kth = default
        sort, select = statistics.median(times["sort"]), statistics.median(times["select"])
        rows = "x".join(map(str, plan.padded_shape))
        print(f"{label:10s} {rows:>12s} {len(ranks):>6d} {sort:8.2f} {select:10.2f} {select / sort:6.2f}  "
              f"{'select' if default else 'sort'}")


if __name__ == "__main__":
    main()
