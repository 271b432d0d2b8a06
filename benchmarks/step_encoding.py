"""Trainer-side cost of one STEP summary on the wire: JSON vs STEP_PACKED, side by side in one run.

    .venv/bin/python benchmarks/step_encoding.py            # a few seconds

Times, in the calling thread's CPU time (time.thread_time), what the trainer's
reader thread does per step after decode_step: encoding the payload into a
frame. Payloads are shaped like the demo model's (4 param groups, deep
statistics every 10th step, a clip coefficient and a few extras on some steps),
each one distinct. Prints microseconds per step, bytes per frame and the ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from adamwatch import wire

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
