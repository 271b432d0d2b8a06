"""Cost of the mid-run configuration check (``check_config_every=1``), measured side by side.

Two watched copies of the demo model train interleaved in one process, one with
the step-boundary configuration check and one without it (``check_config_every=0``);
the median of the per-pair time ratios is the check's overhead. A second line
times the check alone (``group_signature`` and the comparison) against a bare
step of the same model, pair by pair.

    python benchmarks/config_check.py            # CPU, about a minute
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

from trainer_overhead import BATCH, MODELS, make, start_sidecar, train_step  # noqa: E402 (same folder)

import adamwatch  # noqa: E402
from adamwatch.optimizer_config import group_signature  # noqa: E402
from tiny_gpt import ArithmeticCorpus, GPTConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(**MODELS["demo"])
    corpus = ArithmeticCorpus(cfg.block_size, seed=1)
    workdir = tempfile.mkdtemp(prefix="aw-bench-")
    sidecar, endpoint, _ = start_sidecar(workdir)
    try:
        checked_model, checked_opt = make(cfg)
        plain_model, plain_opt = make(cfg)
        ratios, check_ratios = [], []
        with adamwatch.watch(checked_opt, endpoint=endpoint, job="bench-checked", deep_stats_every=0,
                             check_config_every=1) as checked, \
                adamwatch.watch(plain_opt, endpoint=endpoint, job="bench-plain", deep_stats_every=0,
                                check_config_every=0) as plain:
            signature = group_signature(plain_opt)
            for i in range(args.pairs + args.warmup):
                x, y = corpus.batch(BATCH)
                times = {}
                order = (("checked", checked_model, checked_opt, checked), ("plain", plain_model, plain_opt, plain))
                for name, m, o, mon in order if i % 2 == 0 else reversed(order):
                    start = time.perf_counter()
                    train_step(m, o, x, y, mon)
                    times[name] = time.perf_counter() - start
                start = time.perf_counter()
                unchanged = group_signature(plain_opt) == signature
                check = time.perf_counter() - start
                assert unchanged
                if i >= args.warmup:
                    ratios.append(times["checked"] / times["plain"])
                    check_ratios.append(check / times["plain"])
        print(f"torch={torch.__version__} threads={torch.get_num_threads()} model=TinyGPT(layers={cfg.n_layer}, "
              f"width={cfg.n_embd}) batch={BATCH} param_groups={len(plain_opt.param_groups)}")
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"watched with check / watched without   median ratio {statistics.median(ratios):.4f} "
              f"(IQR {q1:.3f}-{q3:.3f}, {len(ratios)} pairs)")
        print(f"check alone / watched step             median ratio {statistics.median(check_ratios):.6f} "
              f"({statistics.median(check_ratios) * 100:.4f} % of a step)")
    finally:
        sidecar.terminate()
        sidecar.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
