"""Trainer-side cost of one STEP summary on the wire: JSON vs STEP_PACKED, side by side in one run.

    .venv/bin/python benchmarks/step_encoding.py            # a few seconds

Times, in the calling thread's CPU time (time.thread_time), what the trainer's
reader thread does per step after decode_step: encoding the payload into a
frame. Payloads are shaped like the demo model's (4 param groups, deep
statistics every 10th step, a clip coefficient and a few extras on some steps),
each one distinct. Prints microseconds per step, bytes per frame and the ratios.

Then the usual step (no deep block, clip or extras) from the reader's vector,
the whole way to a frame: ``decode_step`` + ``encode_step_packed`` (the
general path) against ``Monitor._usual_step_frame`` (``plain_step`` +
``encode_plain_step_packed``: the fast path the client takes for it), same bytes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from adamwatch import wire
from adamwatch.monitor import Monitor
from adamwatch.step_stats import StepLayout

GROUPS = 4


def _payloads(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for step in range(1, n + 1):
        grad_norm = 1.0 + rng.gauss(0.0, 0.02)
        p = {
            "group_grad_norms": [grad_norm / 2 + rng.random() * 1e-3 for _ in range(GROUPS)],
            "grad_norm": grad_norm, "grad_nonfinite": False, "lr": [3e-4 * (1 - step * 1e-6)] * GROUPS,
            "skipped": False, "loss": 2.5 + rng.gauss(0.0, 0.01), "loss_nonfinite": False,
            "step": step, "time": 1.7e9 + step * 0.1, "duration_s": 0.1 + rng.random() * 1e-3,
            "samples": 32, "tokens": 32768, "skip_reason": None,
        }
        if step % 10 == 0:
            p["deep"] = [{"effective_lr": [rng.random() * 1e-3 for _ in range(5)],
                          "update_size": [rng.random() * 1e-4 for _ in range(5)], "update_to_weight": 1e-3,
                          "exp_avg_norm": 0.5, "exp_avg_sq_norm": 0.01, "eps_dominated_ratio": 0.02}] * GROUPS
        if step % 4 == 0:
            p["clip_max_norm"] = 1.0
            p["clip_coefficient"] = min(1.0, 1.0 / (grad_norm + 1e-6))
            p["extras"] = {"spike_guard_clip": 0.0, "spike_guard_skip": 0.0}
        out.append(p)
    return out


def _encode_json(p: dict) -> bytes:
    return wire.encode_frame(wire.MessageType.STEP, p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    payloads = _payloads(args.steps)
    arms = {"json": _encode_json, "packed": wire.encode_step_packed}
    per_step: dict[str, list[float]] = {name: [] for name in arms}
    sizes = {name: sum(len(fn(p)) for p in payloads) / len(payloads) for name, fn in arms.items()}
    for _ in range(args.repeats):  # interleaved, so both arms see the same machine load
        for name, fn in arms.items():
            start = time.thread_time()
            for p in payloads:
                fn(p)
            per_step[name].append((time.thread_time() - start) / len(payloads) * 1e6)
    print(f"encode one STEP (thread CPU, median of {args.repeats} x {args.steps:,} distinct steps):")
    for name in arms:
        print(f"  {name:<7} {statistics.median(per_step[name]):6.2f} us/step   {sizes[name]:6.0f} bytes/frame")
    ratio = statistics.median(per_step["json"]) / statistics.median(per_step["packed"])
    print(f"  json / packed: {ratio:.2f}x CPU, {sizes['json'] / sizes['packed']:.2f}x bytes")

    summaries = _usual_summaries(args.steps)
    paths = {"general": _general, "fast": _fast}
    assert all(_general(v, l) == _fast(v, l) for v, l in summaries[:100])
    spent: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            start = time.thread_time()
            for values, layout in summaries:
                fn(values, layout)
            spent[name].append((time.thread_time() - start) / len(summaries) * 1e6)
    print(f"the usual step from the reader's vector to a STEP_PACKED frame (median of {args.repeats}):")
    for name in paths:
        print(f"  {name:<7} {statistics.median(spent[name]):6.2f} us/step")
    print(f"  general / fast: {statistics.median(spent['general']) / statistics.median(spent['fast']):.2f}x CPU")
    return 0


def _usual_summaries(n: int) -> list[tuple[list[float], StepLayout]]:
    """(values, layout) as the client collects them for usual steps of a 4-group model."""
    rng = random.Random(1)
    out = []
    for step in range(1, n + 1):
        squares = [(0.5 + rng.random() * 1e-3) ** 2 for _ in range(GROUPS)]
        layout = StepLayout(num_groups=GROUPS, has_loss=True, host_loss=None, group_has_grads=[True] * GROUPS,
                            host_lrs=[3e-4 * (1 - step * 1e-6)] * GROUPS, tensor_lr_groups=[])
        layout.meta.update(step=step, time=1.7e9 + step * 0.1, duration_s=0.1 + rng.random() * 1e-3,
                           samples=32, tokens=32768)
        out.append(([2.5 + rng.gauss(0.0, 0.01), sum(squares), 0.0, *squares], layout))
    return out


def _general(values: list[float], layout: StepLayout) -> bytes:
    return wire.encode_step_packed(Monitor._payload(values, layout))


def _fast(values: list[float], layout: StepLayout) -> bytes:
    return Monitor._usual_step_frame(values, layout)[0]


if __name__ == "__main__":
    sys.exit(main())
