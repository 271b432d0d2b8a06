"""Where a step's added time goes: the part after backward, timed step by step, arms interleaved.

``trainer_overhead.py`` gives what a user pays (summed step times, ratio to bare),
but on this shared 2-core machine a whole step's run-to-run noise (±0.01-0.02 as
a ratio) is as large as the differences issue 8 asks about (adamwatch against a
hand-written logger; adamwatch on top of clipping against clipping alone, +0.005).
This benchmark resolves them where the arms differ: the code between the end of
``loss.backward()`` and the end of ``zero_grad()``, which is the same for every
arm except what the arm adds (``observe_loss``, the hand-written logging, the
clip, the optimizer hooks). Forward and backward, identical for every arm, are
timed too but kept out of the comparison.

Six copies of the model (the demo's unless ``--model`` says otherwise; same
initial weights, same batches) train interleaved, the order rotating every
iteration, with trainer_overhead.py's own step code; the watched arms stream to
one real ``adamwatch-sidecar`` process, each client pausing six times the default
100 ms between sends, since each arm steps six times slower than alone. Per arm it prints the mean time after
backward (and its median), the mean added over bare with min / median / max
over the repeats, and the added time as a share of bare's whole step. A second
bare arm, which adds nothing, shows what the run resolves. What it cannot see:
the client threads' CPU taken from forward and backward (the GIL); read
``trainer_overhead.py`` for that.

    python benchmarks/step_sections.py                 # demo model, about a minute
    python benchmarks/step_sections.py --iterations 1500 --repeats 5

Targets (issue 8, on this CPU): adamwatch <= the naive logger; adamwatch with
clipping <= clipping alone + 0.005 of a step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_overhead import BATCH, MODELS, ArithmeticCorpus, Arm, GPTConfig, start_sidecar  # noqa: E402

# name -> what trainer_overhead.Arm adds to the step
ARMS = {
    "bare": {},
    "bare, second copy": {},  # adds nothing: the run's resolution
    "naive logger": dict(naive=True),
    "clipping": dict(clip=True),
    "adamwatch": dict(watch=dict(deep_stats_every=0)),
    "adamwatch + clipping": dict(clip=True, watch=dict(deep_stats_every=0)),
}


class TimedArm:
    """One of trainer_overhead's arms (the same step code), with the step split at the end of backward."""

    def __init__(self, name: str, cfg: GPTConfig, settings: types.SimpleNamespace):
        self.name = name
        options = dict(ARMS[name])
        if "watch" in options:
            # Each arm steps once per turn of all arms: its client paces its sends
            # that many times 100 ms (the default pause), so that it sends as many
            # steps per turn as a run training alone, and is never woken from idle
            # by a step, which such a run never is either.
            options["watch"] = dict(options["watch"], batch_interval=0.1 * len(ARMS))
        self.arm = Arm(name, cfg, settings, **options)
        self.after: list[int] = []  # ns from the end of backward to the end of zero_grad
        self.whole: list[int] = []  # ns for the whole step
        self._backward_done = 0

    def _mark(self) -> None:
        self._backward_done = time.perf_counter_ns()

    def step(self, x: torch.Tensor, y: torch.Tensor, keep: bool) -> None:
        start = time.perf_counter_ns()
        self.arm.step(x, y, after_backward=self._mark)
        end = time.perf_counter_ns()
        if keep:
            self.after.append(end - self._backward_done)
            self.whole.append(end - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--iterations", type=int, default=600, help="steps per arm, split over the repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    if args.iterations < args.repeats:
        parser.error("--iterations must be at least --repeats")
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(block_size=64, **MODELS[args.model])  # trainer_overhead.py's models
    corpus = ArithmeticCorpus(cfg.block_size, seed=1)
    settings = types.SimpleNamespace(device="cpu", groups=2, impl="default")
    workdir = tempfile.mkdtemp(prefix="aw-bench-")
    sidecar, endpoint, _ = start_sidecar(workdir)
    try:
        arms = [TimedArm(name, cfg, settings) for name in ARMS]
        for i, arm in enumerate(arms):
            arm.arm.start(endpoint, f"sections-{os.getpid()}-{i}")
        for i in range(args.warmup + args.iterations):
            x, y = corpus.batch(BATCH)
            turn = i % len(arms)
            for arm in arms[turn:] + arms[:turn]:
                arm.step(x, y, keep=i >= args.warmup)
        for arm in arms:
            if arm.arm.monitor is not None:
                arm.arm.monitor.close()
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    report(arms, args)
    return 0


def report(arms: list[TimedArm], args) -> None:
    bare = arms[0]
    per = args.iterations // args.repeats
    chunks = [slice(r * per, (r + 1) * per) for r in range(args.repeats)]
    bare_step = statistics.mean(bare.whole)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} model={args.model} "
          f"iterations={args.iterations} repeats={args.repeats}")
    print(f"bare step {bare_step / 1e6:.2f} ms (mean); after backward {statistics.mean(bare.after) / 1e3:.1f} us")
    print(f"{'arm':<22}{'after backward, us mean / median':>34}{'added us (min / median / max)':>34}"
          f"{'added, share of a step':>26}{'whole step added, us':>24}")
    added: dict[str, float] = {}
    for arm in arms:
        over = [statistics.mean(arm.after[c]) - statistics.mean(bare.after[c]) for c in chunks]
        added[arm.name] = statistics.median(over)
        # The whole step too (forward and backward are the same for every arm, but the
        # client threads' turns land there): noisier, for comparison only.
        whole = statistics.mean(arm.whole) - bare_step
        print(f"{arm.name:<22}{statistics.mean(arm.after) / 1e3:>20.1f} / {statistics.median(arm.after) / 1e3:<11.1f}"
              f"{min(over) / 1e3:>16.1f} / {statistics.median(over) / 1e3:.1f} / {max(over) / 1e3:<6.1f}"
              f"{added[arm.name] / bare_step:>+18.4f}{whole / 1e3:>+22.1f}")
    twin = added["bare, second copy"] / bare_step
    print(f"resolution of this run: bare's second copy reads {twin:+.4f} of a step")
    vs_naive = (added["adamwatch"] - added["naive logger"]) / bare_step
    on_clip = (added["adamwatch + clipping"] - added["clipping"]) / bare_step
    print(f"adamwatch - naive logger: {vs_naive:+.4f} of a step (target <= 0: {'OK' if vs_naive <= 0 else 'OVER'})")
    print(f"adamwatch + clipping - clipping: {on_clip:+.4f} of a step "
          f"(target <= 0.005: {'OK' if on_clip <= 0.005 else 'OVER'})")


if __name__ == "__main__":
    raise SystemExit(main())
