"""Cost of issue 11's trainer-side reporting, side by side with the optimizer step it rides along.

Nothing new runs in the step path. What runs elsewhere:

- ``footprint_payload`` (bytes by dtype, CUDA allocator counters) on the background
  thread every ``footprint_interval`` seconds (30 by default): it holds the GIL
  for its duration, so it is compared here with one optimizer step;
- ``monitor.observe_eval`` on the training thread, once per evaluation (not per step).

Each measurement is interleaved with bare optimizer steps of the demo model, and the
script prints the medians and their ratio. About 20 seconds on a 2-core CPU.

    python benchmarks/run_reporting.py [--device cuda]
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

from demo import BATCH, MODEL  # noqa: E402  (the demo's model)
from tiny_gpt import ArithmeticCorpus, TinyGPT  # noqa: E402

from adamwatch.evaluation import EvalRecorder  # noqa: E402
from adamwatch.footprint import footprint_payload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TinyGPT(MODEL).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    corpus = ArithmeticCorpus(MODEL.block_size, seed=0)
    recorder = EvalRecorder(capacity=10**9)

    def step() -> None:
        x, y = (t.to(device) for t in corpus.batch(BATCH))
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(10):
        step()
    val = torch.tensor(1.0, device=device)
    steps, footprints, evals = [], [], []
    for i in range(args.rounds):
        steps.append(timed(step))
        footprints.append(timed(lambda: footprint_payload(optimizer, now=0.0)))
        evals.append(timed(lambda: recorder.observe(i, {"loss": val, "accuracy": 0.5}, now=0.0)))
        recorder.drain()
    n_tensors = sum(len(g["params"]) for g in optimizer.param_groups)
    s, f, e = statistics.median(steps), statistics.median(footprints), statistics.median(evals)
    print(f"model: {n_tensors} parameter tensors, {sum(p.numel() for p in model.parameters()):,} parameters, {device}")
    print(f"optimizer step (forward+backward+AdamW) median: {s * 1e3:8.3f} ms")
    print(f"footprint_payload median:                     {f * 1e3:8.3f} ms  ratio to a step {f / s:.4f} "
          f"(once per 30 s by default)")
    print(f"observe_eval (tensor + float) median:         {e * 1e3:8.3f} ms  ratio to a step {e / s:.4f} "
          f"(once per evaluation)")


if __name__ == "__main__":
    main()
