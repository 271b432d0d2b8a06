"""One rank of the cross-rank tests: a small model under DDP, FSDP1 or FSDP2 on gloo/CPU.

argv: rank world workdir scenario layout impl nan [endpoint]
scenario: "pieces" (CrossRankReduction driven directly) | "monitor" (adamwatch.watch, streams to endpoint)
layout: ddp | fsdp1 | fsdp2;  impl: loop | foreach | fused
nan: none | shard (rank 1 writes NaN into its own gradient shard after backward at step NAN_STEP)
     | input (rank 1's input is NaN at step NAN_STEP: its loss and its gradients before the reduction)
     | input-streak (the same at three steps in a row: the sidecar's non-finite detector fires)
Writes workdir/rank<r>.json with the framework's own norms next to what adamwatch computed.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from adamwatch.comm_watch import watch_local_grads
from adamwatch.cross_rank import CrossRankReduction
from adamwatch.shards import is_dtensor, local_tensor
from adamwatch.step_stats import StepStats, decode_step

STEPS = 6
NAN_STEP = 3  # 1-based
NAN_RANK = 1
DEEP_EVERY = 2


def build(layout: str):
    torch.manual_seed(0)  # same init on every rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), model
    if layout in ("fsdp1", "fsdp1orig"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=layout == "fsdp1orig")
        return wrapped, wrapped
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model)
    return model, model


def param_groups(model, layout: str) -> list[dict]:
    if layout == "fsdp1":  # one flat parameter
        return [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")], "lr": 5e-3},
    ]


def make_optimizer(groups, impl: str):
    options = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=1e-2, **options)


def reference_norms(wrapped, optimizer, layout: str) -> tuple[float, list[float]]:
    """The framework's own total norm (clip_grad_norm_ with an infinite max) and per group."""
    def as_float(t):
        return float(t.full_tensor() if is_dtensor(t) else t)

    if layout.startswith("fsdp1"):
        total = as_float(wrapped.clip_grad_norm_(math.inf))
        if layout == "fsdp1":
            return total, [total]
        groups = []
        for group in optimizer.param_groups:  # views of the flat shards: all-reduce their squares
            sq = torch.zeros((), dtype=torch.float64)
            for p in group["params"]:
                if p.grad is not None:
                    sq += p.grad.double().square().sum()
            dist.all_reduce(sq)
            groups.append(math.sqrt(float(sq)))
        return total, groups
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total = as_float(torch.nn.utils.clip_grad_norm_(params, math.inf))
    groups = [as_float(torch.nn.utils.clip_grad_norm_(g["params"], math.inf)) for g in optimizer.param_groups]
    return total, groups


def reference_state_norms(optimizer, key: str, layout: str) -> list[float]:
    """Global norm of an Adam state tensor per group: full_tensor() (FSDP2), all-reduced shards (FSDP1), local (DDP)."""
    out = []
    for group in optimizer.param_groups:
        sq = torch.zeros((), dtype=torch.float64)
        for p in group["params"]:
            t = optimizer.state.get(p, {}).get(key)
            if t is None:  # FSDP1 use_orig_params: this rank's shard of p is empty
                continue
            sq += (t.full_tensor() if is_dtensor(t) else t).double().square().sum()
        if layout.startswith("fsdp1"):
            dist.all_reduce(sq)
        out.append(math.sqrt(float(sq)))
    return out


def batch(rank: int, step: int, nan: str):
    g = torch.Generator().manual_seed(1000 * rank + step)  # different data on every rank
    x = torch.randn(8, 6, generator=g)
    y = torch.randn(8, 4, generator=g)
    streak = (NAN_STEP, NAN_STEP + 1, NAN_STEP + 2) if nan == "input-streak" else (NAN_STEP,)
    if nan.startswith("input") and rank == NAN_RANK and step in streak:
        x[0, 0] = float("nan")
    return x, y


def poison_shard(optimizer) -> None:
    p = optimizer.param_groups[0]["params"][0]
    local_tensor(p.grad).view(-1)[0] = float("nan")


class Ctx:
    """The StepContext fields CrossRankReduction uses (the pieces scenario drives it directly)."""

    def __init__(self, optimizer, sq, loss):
        self.optimizer = optimizer
        self.params_by_group = [[p for p in g["params"] if p.grad is not None] for g in optimizer.param_groups]
        self.grads_by_group = [[p.grad for p in ps] for ps in self.params_by_group]
        self.group_norm_sq = sq
        self.loss = loss.detach().float().reshape(())
        self.has_loss = True
        self.nonfinite = ~torch.isfinite(sq.sum()) | ~torch.isfinite(self.loss)
        self.extras = {}
        self.groups_reported = None

    def add_extra(self, name, value):
        self.extras[name] = float(value)


def steps_and_states(optimizer) -> dict:
    state = optimizer.state
    return {
        "adam_steps": [float(local_tensor(state[p]["step"])) for g in optimizer.param_groups for p in g["params"]
                       if "step" in state.get(p, {})],
        "params": [local_tensor(p).detach().reshape(-1).tolist() for g in optimizer.param_groups for p in g["params"]],
    }


def pieces(rank: int, world: int, layout: str, impl: str, nan: str) -> dict:
    wrapped, model = build(layout)
    optimizer = make_optimizer(param_groups(model, layout), impl)
    # "input-unwatched": no communication check, so only the loss can name the origin
    local_grads = None if nan == "input-unwatched" else watch_local_grads(wrapped)
    # "replicated-in-sharded": DDP's replicated params under a forced sharded layout, as
    # replicated tensors inside a sharded model are: each must count once, not once per rank
    layout_arg = "sharded" if nan == "replicated-in-sharded" else "auto"
    reduction = CrossRankReduction(optimizer, local_grads=local_grads, layout=layout_arg)
    stats = StepStats(optimizer)
    records = []
    for step in range(1, STEPS + 1):
        x, y = batch(rank, step, nan)
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        if nan == "shard" and rank == NAN_RANK and step == NAN_STEP:
            poison_shard(optimizer)
        vector, _, layout_ = stats.per_step(loss)
        groups = len(optimizer.param_groups)
        ctx = Ctx(optimizer, vector[3:3 + groups].clone(), loss)
        reduction.on_summary(ctx)
        summary = torch.cat([vector[:1], ctx.group_norm_sq.sum().reshape(1), vector[2:3], ctx.group_norm_sq])
        if ctx.groups_reported is not None:
            layout_.group_has_grads = list(ctx.groups_reported)
        payload = decode_step(summary.tolist(), layout_)
        ref_total, ref_groups = reference_norms(wrapped, optimizer, layout)
        skip = ctx.nonfinite.to(torch.float32)
        if impl == "fused":
            optimizer.found_inf = skip
        elif bool(ctx.nonfinite):  # guard="sync" semantics, in the test only
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None
        optimizer.step()
        if impl == "fused":
            del optimizer.found_inf
        record = {
            "step": step, "ref_total": ref_total, "ref_groups": ref_groups,
            "total": payload["grad_norm"], "groups": payload["group_grad_norms"],
            "nonfinite": bool(ctx.nonfinite), "extras": ctx.extras, "reductions": reduction.reductions,
        }
        if step % DEEP_EVERY == 0:
            deep, present = stats.deep()
            deep, present = reduction.reduce_deep(deep, present)
            layout_.deep_groups = present
            decoded = decode_step(torch.cat([summary, deep]).tolist(), layout_)["deep"]
            record["m_norms"] = [d["exp_avg_norm"] for d in decoded]
            record["v_norms"] = [d["exp_avg_sq_norm"] for d in decoded]
            record["ref_m_norms"] = reference_state_norms(optimizer, "exp_avg", layout)
            record["ref_v_norms"] = reference_state_norms(optimizer, "exp_avg_sq", layout)
        records.append(record)
        optimizer.zero_grad()
    return {"records": records, "grad_origin_watch": local_grads and local_grads.kind, **steps_and_states(optimizer)}


def monitored(rank: int, world: int, layout: str, impl: str, nan: str, endpoint: str) -> dict:
    """The real thing: adamwatch.watch() registers the cross-rank reduction and streams to a sidecar."""
    import adamwatch

    wrapped, model = build(layout)
    optimizer = make_optimizer(param_groups(model, layout), impl)
    local_grads = watch_local_grads(wrapped)
    monitor = adamwatch.watch(optimizer, endpoint=endpoint, job=f"dist-{layout}-{impl}", deep_stats_every=DEEP_EVERY,
                              local_grads=local_grads, batch_interval=0,
                              # for-loop/foreach have no found_inf: the documented one-sync guard skips
                              guard="auto" if impl == "fused" else "sync")
    if nan == "skip-ext":
        # a later extension asks to skip step NAN_STEP on rank 1 only (a rank-local judgement)
        class SkipOnOneRank:
            def __init__(self):
                self.step = 0

            def on_summary(self, ctx):
                self.step += 1
                ctx.request_skip(torch.tensor(rank == NAN_RANK and self.step == NAN_STEP), "test")

        monitor.add_step_extension(SkipOnOneRank())
    records = []
    for step in range(1, STEPS + 1):
        x, y = batch(rank, step, nan)
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        if nan == "shard" and rank == NAN_RANK and step == NAN_STEP:
            poison_shard(optimizer)
        ref_total, ref_groups = reference_norms(wrapped, optimizer, layout)
        optimizer.step()
        record = {"step": step, "ref_total": ref_total, "ref_groups": ref_groups, "loss": float(loss)}
        if step % DEEP_EVERY == 0:
            record["ref_m_norms"] = reference_state_norms(optimizer, "exp_avg", layout)
            record["ref_v_norms"] = reference_state_norms(optimizer, "exp_avg_sq", layout)
        records.append(record)
        optimizer.zero_grad()
    monitor.close()
    return {"records": records, "errors": monitor.errors, **steps_and_states(optimizer)}


def nosync(rank: int, world: int, layout: str, impl: str) -> dict:
    """Host reads on the training thread over whole iterations (forward, backward with the
    communication hook, step with the all-reduce), watched against bare."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import adamwatch
    from tests.trainer.test_no_host_sync import HostReadCounter

    def iteration(wrapped, optimizer, monitor, step):
        x, y = batch(rank, step, "none")
        counter = HostReadCounter()
        with counter.counting():
            loss = torch.nn.functional.mse_loss(wrapped(x), y)
            loss.backward()
            if monitor is not None:
                monitor.observe_loss(loss)
            optimizer.step()
        optimizer.zero_grad()
        return counter.calls

    bare_wrapped, bare_model = build(layout)
    bare_opt = make_optimizer(param_groups(bare_model, layout), impl)
    wrapped, model = build(layout)
    optimizer = make_optimizer(param_groups(model, layout), impl)
    monitor = adamwatch.watch(optimizer, local_grads=watch_local_grads(wrapped), deep_stats_every=1)
    iteration(bare_wrapped, bare_opt, None, 1)  # Adam's state is created on the first step
    iteration(wrapped, optimizer, monitor, 1)
    counts = []
    for step in range(2, 5):
        counts.append([iteration(bare_wrapped, bare_opt, None, step), iteration(wrapped, optimizer, monitor, step)])
    reductions = monitor._cross_rank.reductions
    monitor.close()
    return {"counts": counts, "reductions": reductions, "errors": monitor.errors}


def cuda_fsdp2(rank: int, world: int) -> dict:
    """FSDP2 on one CUDA device per rank, NCCL, fused AdamW, watched steps under sync debug mode "error"."""
    import adamwatch
    from torch.distributed.fsdp import fully_shard

    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    fully_shard(model[0])
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    monitor = adamwatch.watch(optimizer, cross_rank="on", local_grads=watch_local_grads(model), deep_stats_every=10)
    x = torch.randn(64, 256, device="cuda")

    def iteration():
        loss = model(x).square().mean()
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # Adam allocates its state on the first step
        iteration()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(30):
            iteration()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    reductions = monitor._cross_rank.reductions
    monitor.close()
    return {"errors": monitor.errors, "errors_by_where": monitor.errors_by_where, "reductions": reductions}


def main() -> None:
    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    scenario, layout, impl, nan = sys.argv[4:8]
    dist.init_process_group("nccl" if scenario == "cuda" else "gloo", init_method=f"file://{workdir}/store",
                            rank=rank, world_size=world, timeout=timedelta(seconds=60))
    if scenario == "pieces":
        result = pieces(rank, world, layout, impl, nan)
    elif scenario == "cuda":
        result = cuda_fsdp2(rank, world)
    elif scenario == "nosync":
        result = nosync(rank, world, layout, impl)
    elif scenario == "monitor":
        result = monitored(rank, world, layout, impl, nan, sys.argv[8])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    (workdir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
