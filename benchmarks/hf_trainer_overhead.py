"""Overhead of ``AdamwatchCallback`` on a Hugging Face ``Trainer``: bare and watched runs interleaved.

A Trainer loop cannot be stepped from outside, so the arms alternate in blocks:
each block trains a bare Trainer and a watched one (order alternating) for the
same number of steps on the same tiny GPT-2; the ratio of their median step
times (``on_step_begin`` to ``on_step_end``: forward, backward, clipping,
optimizer step) is one sample, and the median over blocks is the overhead.
The watched arm streams to a real ``adamwatch-sidecar`` process.

    python benchmarks/hf_trainer_overhead.py            # CPU, about a minute
    python benchmarks/hf_trainer_overhead.py --device cuda --steps 100
"""

from __future__ import annotations

import argparse
import logging
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

from demo import free_port, sidecar_command, wait_ready  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from adamwatch.integrations.huggingface import AdamwatchCallback  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.durations.append(time.perf_counter() - self._start)


def dataset(n: int, length: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def run_arm(watched: bool, args, endpoint: str | None, workdir: str) -> float:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=args.width,
                                       n_layer=args.layers, n_head=4, bos_token_id=0, eos_token_id=0))
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if watched:
        callbacks.append(AdamwatchCallback(endpoint=endpoint, job="bench-hf", rank=0))
    training = TrainingArguments(
        output_dir=os.path.join(workdir, "out"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulate, logging_steps=args.steps, report_to=[], save_strategy="no",
        use_cpu=args.device == "cpu", max_grad_norm=1.0, learning_rate=3e-4, disable_tqdm=True,
        optim="adamw_torch_fused" if args.fused else "adamw_torch", seed=0,
    )
    data = dataset(args.steps * args.batch * args.accumulate, args.seq, 256)
    Trainer(model=model, args=training, train_dataset=data, callbacks=callbacks).train()
    return statistics.median(timer.durations[args.warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, default=6, help="bare/watched pairs of runs")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps of each run left out of its median")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--fused", action="store_true", help="optim=adamw_torch_fused")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared, loaded CPU more threads only add noise)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.getLogger("adamwatch").setLevel(logging.ERROR)

    workdir = tempfile.mkdtemp(prefix="aw-bench-hf-")
    sock = os.path.join(workdir, "aw.sock")
    port = free_port(0)
    sidecar = subprocess.Popen(
        sidecar_command() + ["serve", "--listen", f"unix://{sock}", "--metrics-address", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", sidecar)
        ratios, bare_ms, watched_ms = [], [], []
        for block in range(args.blocks):
            arms = (False, True) if block % 2 == 0 else (True, False)
            medians = {watched: run_arm(watched, args, f"unix://{sock}", workdir) for watched in arms}
            bare_ms.append(medians[False] * 1e3)
            watched_ms.append(medians[True] * 1e3)
            ratios.append(medians[True] / medians[False])
            print(f"block {block}: bare {bare_ms[-1]:.2f} ms  watched {watched_ms[-1]:.2f} ms  "
                  f"ratio {ratios[-1]:.4f}", flush=True)
        print(f"\nHF Trainer + AdamwatchCallback on {args.device}, {args.blocks} interleaved blocks of "
              f"{args.steps} steps (GA={args.accumulate}, clipping at 1.0, {'fused' if args.fused else 'for-loop'} AdamW)")
        print("| arm | median step (ms) |\n| --- | --- |")
        print(f"| bare Trainer | {statistics.median(bare_ms):.2f} |")
        print(f"| Trainer + AdamwatchCallback | {statistics.median(watched_ms):.2f} |")
        print(f"watched/bare ratio: median {statistics.median(ratios):.4f}, "
              f"min {min(ratios):.4f}, max {max(ratios):.4f}")
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
