"""Per-step cost of the cross-rank reduction (adamwatch.cross_rank), side by side with a rank-local monitor.

    .venv/bin/python benchmarks/distributed_overhead.py              # 2 gloo ranks on CPU, about a minute
    .venv/bin/python benchmarks/distributed_overhead.py --world 3 --layouts fsdp2

Spawns ``--world`` rank processes joined by gloo on this machine. In each
layout (DDP, FSDP2) every rank builds three identical models and trains them
in interleaved rounds, so load on the machine hits all three alike:

- ``bare``: no adamwatch;
- ``local``: ``adamwatch.watch(..., cross_rank="off")``: every number rank-local;
- ``reduce``: ``adamwatch.watch(...)``: the cross-rank reduction, without the
  pre-reduction gradient check;
- ``global``: the same plus the check (``watch_local_grads``): everything.

It prints the median step time of each and the ratios global/local (the price
of global numbers) and global/bare (the whole monitor), plus the mean time
spent inside ``CrossRankReduction.on_summary`` (the all-reduce included). On
CPU/gloo the all-reduce runs on the host; on CUDA/NCCL the wait is the
stream's, not the host's, so these CPU figures are an upper bound for the host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(torch, width: int, depth: int):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def _wrap(torch, model, layout: str):
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), model
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, model


def rank_main(rank: int, world: int, workdir: str, layouts: list[str], rounds: int, steps: int, width: int,
              depth: int) -> None:
    import torch
    import torch.distributed as dist

    import adamwatch
    from adamwatch.comm_watch import watch_local_grads
    from adamwatch.cross_rank import CrossRankReduction

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    inside = []
    original = CrossRankReduction.on_summary

    def timed(self, ctx):
        started = time.perf_counter()
        original(self, ctx)
        inside.append(time.perf_counter() - started)

    CrossRankReduction.on_summary = timed
    results = {}
    for layout in layouts:
        variants = {}
        for name in ("bare", "local", "reduce", "global"):
            wrapped, model = _wrap(torch, _model(torch, width, depth), layout)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            monitor = None
            if name == "local":
                monitor = adamwatch.watch(optimizer, cross_rank="off", deep_stats_every=10)
            elif name == "reduce":
                monitor = adamwatch.watch(optimizer, deep_stats_every=10)
            elif name == "global":
                monitor = adamwatch.watch(optimizer, local_grads=watch_local_grads(wrapped), deep_stats_every=10)
            variants[name] = (wrapped, optimizer, monitor)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(32, width, generator=g)
        times = {name: [] for name in variants}
        inside.clear()
        for round_index in range(rounds + 1):  # round 0 warms up
            for name, (wrapped, optimizer, monitor) in variants.items():
                dist.barrier()
                started = time.perf_counter()
                for _ in range(steps):
                    loss = wrapped(x).square().mean()
                    loss.backward()
                    if monitor is not None:
                        monitor.observe_loss(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                elapsed = (time.perf_counter() - started) / steps
                if round_index:
                    times[name].append(elapsed)
        warm = inside[steps:]  # the warm-up round's calls
        # The all-reduce alone, ranks in step (after a barrier): its own cost,
        # without the waiting for a slower rank that the in-step figure includes.
        reduction = variants["global"][2]._cross_rank
        packet = torch.zeros(len(variants["global"][1].param_groups) * reduction.sharded + 1 + 2 * world,
                             dtype=torch.float64)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(packet, group=reduction.group, async_op=True).wait()
        alone = (time.perf_counter() - started) / 200
        results[layout] = {
            "median_s": {name: statistics.median(t) for name, t in times.items()},
            "on_summary_mean_s": statistics.fmean(warm) if warm else None,
            "all_reduce_alone_s": alone,
        }
        for _, (_, _, monitor) in variants.items():
            if monitor is not None:
                monitor.close()
    (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layouts", default="ddp,fsdp2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    if args.rank is not None:
        rank_main(args.rank, args.world, args.workdir, layouts, args.rounds, args.steps, args.width, args.depth)
        return
    workdir = tempfile.mkdtemp(prefix="aw-dist-bench-")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "instrumentation"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--workdir", workdir, "--world", str(args.world),
                          "--layouts", args.layouts, "--rounds", str(args.rounds), "--steps", str(args.steps),
                          "--width", str(args.width), "--depth", str(args.depth)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(args.world)
    ]
    try:
        for r, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"rank {r} failed:\n{out[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    ranks = [json.loads((Path(workdir) / f"rank{r}.json").read_text()) for r in range(args.world)]
    shutil.rmtree(workdir, ignore_errors=True)
    params = args.depth * (args.width * args.width + args.width)
    print(f"{args.world} gloo ranks on CPU, {args.depth} x Linear({args.width}) = {params:,} params, fused AdamW, "
          f"{args.rounds} rounds x {args.steps} steps per variant (medians of rank 0; max over ranks in brackets)")
    for layout in layouts:
        med = ranks[0][layout]["median_s"]
        inside = [r[layout]["on_summary_mean_s"] for r in ranks]
        gl = [r[layout]["median_s"]["global"] / r[layout]["median_s"]["local"] for r in ranks]
        gb = [r[layout]["median_s"]["global"] / r[layout]["median_s"]["bare"] for r in ranks]
        rl = [r[layout]["median_s"]["reduce"] / r[layout]["median_s"]["local"] for r in ranks]
        print(f"{layout:6s} step: bare {med['bare'] * 1e3:.2f} ms, local {med['local'] * 1e3:.2f} ms, "
              f"reduce {med['reduce'] * 1e3:.2f} ms, global {med['global'] * 1e3:.2f} ms | "
              f"reduce/local {rl[0]:.3f} [{max(rl):.3f}], global/local {gl[0]:.3f} [{max(gl):.3f}], "
              f"global/bare {gb[0]:.3f} [{max(gb):.3f}] | inside the reduction "
              f"{inside[0] * 1e6:.0f} us/step [{max(inside) * 1e6:.0f}], the all-reduce alone "
              f"{ranks[0][layout]['all_reduce_alone_s'] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
