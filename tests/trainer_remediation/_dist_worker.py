"""One rank of the gloo tests: train a small DDP model, remediate on rank 0 only.

argv: rank world_size workdir scenario [side]
scenario: "ladder" (interval 1) | "interval" (interval 4) | "noblock" | "close" | "buffer" | "monitor" | "cost";
"side" forces the gloo side group that a non-gloo default backend (NCCL) gets.
Rank 0 writes workdir/result.json with what it compared.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adamwatch.checkpoint import Checkpointer
from adamwatch import distributed
from adamwatch.distributed import StepCoordinator
from adamwatch.remediation import Action, Remediator


def snapshot(model, optimizer) -> dict:
    state = optimizer.state_dict()["state"]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "m": [state[k]["exp_avg"].clone() for k in sorted(state)],
        "v": [state[k]["exp_avg_sq"].clone() for k in sorted(state)],
        "step": [state[k]["step"].clone() for k in sorted(state)],
        "lrs": [float(g["lr"]) for g in optimizer.param_groups],
    }


def gather_snapshot(snap: dict, world: int) -> list[dict]:
    """all_gather every tensor (same shapes on every rank) and the lrs; numpy-free."""
    out = [{"lrs": None} for _ in range(world)]
    for key in ("params", "m", "v", "step"):
        for r in range(world):
            out[r][key] = []
        for t in snap[key]:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            for r in range(world):
                out[r][key].append(parts[r])
    lrs = torch.tensor(snap["lrs"], dtype=torch.float64)
    parts = [torch.empty_like(lrs) for _ in range(world)]
    dist.all_gather(parts, lrs)
    for r in range(world):
        out[r]["lrs"] = parts[r].tolist()
    return out


def gather_json(obj, world: int, size: int = 8192) -> list:
    data = json.dumps(obj).encode()
    assert len(data) <= size
    t = torch.zeros(size + 8, dtype=torch.uint8)
    t[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    t[8 : 8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    result = []
    for p in parts:
        raw = bytes(p.tolist())
        n = int.from_bytes(raw[:8], "little")
        result.append(json.loads(raw[8 : 8 + n].decode()))
    return result


def same(a: dict, b: dict) -> list[str]:
    problems = []
    for key in ("params", "m", "v", "step"):
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            if not torch.equal(x, y):
                problems.append(f"{key}[{i}]")
    if a["lrs"] != b["lrs"]:
        problems.append(f"lrs {a['lrs']} != {b['lrs']}")
    return problems


# what rank 0 issues, per scenario: step -> action
ISSUES = {
    "ladder": {5: ("reduce_lr", {"factor": 0.5}), 9: ("restore_checkpoint", {"step": None})},
    "interval": {4: ("reduce_lr", {"factor": 0.5}), 9: ("restore_checkpoint", {"step": None})},
}
FILE_WAIT_S = 30


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + FILE_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.01)


def noblock(rank: int, world: int, workdir: Path) -> None:
    """Rank 1 runs steps 1..7 (interval 4) before rank 0 even starts: none of them may wait for rank 0."""
    coordinator = StepCoordinator(interval=4)
    applied = []
    timings = []
    if rank == 0:
        wait_for_file(workdir / "rank1-done-7")  # the old blocking broadcast never gets rank 1 here
    for step in range(1, 13):
        local = [Action("reduce_lr", {"factor": 0.5})] if rank == 0 and step == 4 else []
        start = time.perf_counter()
        actions = coordinator.exchange(step, local)
        timings.append(time.perf_counter() - start)
        applied += [[a.kind, step] for a in actions]
        if rank == 1 and step == 7:
            (workdir / "rank1-done-7").write_text("")
    meta = gather_json({"applied": applied, "exchanges": coordinator.exchanges, "late_waits": coordinator.late_waits,
                        "first7_max_s": max(timings[:7])}, world)
    coordinator.close()
    if rank == 0:
        (workdir / "result.json").write_text(json.dumps({"ranks": meta}))


def close_scenario(rank: int, world: int, workdir: Path) -> None:
    """close() with a broadcast in flight: returns its actions; abandons one that cannot complete."""
    coordinator = StepCoordinator(interval=1)
    local = [Action("reduce_lr", {"factor": 0.5})] if rank == 0 else []
    first = coordinator.exchange(1, local)
    lost = coordinator.close(timeout=10)
    after_close = coordinator.exchange(2, local)
    # a broadcast that never completes: rank 0 never joins, on a group of its own
    group = dist.new_group(backend="gloo")
    stuck = StepCoordinator(group)
    start = time.perf_counter()
    stuck_lost = []
    if rank != 0:
        stuck.exchange(1, [])
        stuck_lost = stuck.close(timeout=1.0)
    close_s = time.perf_counter() - start
    meta = gather_json({"first": [a.kind for a in first], "lost": [a.kind for a in lost],
                        "after_close": [a.kind for a in after_close], "stuck_lost": stuck_lost,
                        "stuck_close_s": close_s}, world)
    if rank == 0:
        (workdir / "result.json").write_text(json.dumps({"ranks": meta}))


def buffer_scenario(rank: int, world: int, workdir: Path) -> None:
    """A 256-byte buffer carries one action per round: the rest wait in order; an oversized one is dropped."""
    coordinator = StepCoordinator(interval=1, buffer_bytes=256)
    applied = []
    for step in range(1, 7):
        local = []
        if rank == 0 and step == 1:
            local = [Action("reduce_lr", {"factor": f}, reason="r" * 100) for f in (0.5, 0.6)]
            local.insert(1, Action("reduce_lr", {"factor": 0.9}, reason="too big " * 100))
            local.append(Action("reduce_lr", {"factor": 0.7}, reason="r" * 100))
        applied += [[a.args["factor"], step] for a in coordinator.exchange(step, local)]
    meta = gather_json({"applied": applied, "dropped": coordinator.dropped}, world)
    coordinator.close()
    if rank == 0:
        (workdir / "result.json").write_text(json.dumps({"ranks": meta}))


def monitor_scenario(rank: int, world: int, workdir: Path) -> None:
    """The real Monitor (command_interval=2): every rank calls reduce_lr, rank 0 alone restores."""
    import adamwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + 0.05 * e))
    ckpt = Checkpointer(workdir / f"rank{rank}", model=ddp, optimizer=optimizer, scheduler=scheduler, good_window=1)
    monitor = adamwatch.watch(optimizer, scheduler=scheduler, checkpointer=ckpt, endpoint=None, command_interval=2)
    torch.manual_seed(100 + rank)
    trace = []
    refused = None
    for _ in range(16):
        x = torch.randn(16, 8)
        loss = torch.nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True))
        monitor.observe_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        trace.append([monitor.step, monitor.lr_scale, float(optimizer.param_groups[0]["lr"])])
        if monitor.step in (3, 6) and not (workdir / f"rank{rank}" / f"saved-{monitor.step}").exists():
            ckpt.save(monitor.step)
            (workdir / f"rank{rank}" / f"saved-{monitor.step}").write_text("")
        if monitor.step == 4 and len(trace) == 4:
            try:  # on every rank, as user code does: rank 0's copy counts, the others are refused
                monitor.reduce_lr(0.5)
                refused = False
            except RuntimeError as exc:
                refused = str(exc)
        if rank == 0 and len(trace) == 9:
            monitor.restore_checkpoint(step=3)
    coordinator = monitor._coordinator
    info = {"trace": trace, "dropped": coordinator.dropped, "exchanges": coordinator.exchanges,
            "errors": monitor.errors, "refused": refused}
    monitor.close()
    meta = gather_json(info, world)
    snaps = gather_snapshot(snapshot(model, optimizer), world)
    if rank == 0:
        problems = [f"rank {r} {p}" for r in range(world) for p in same(snaps[0], snaps[r])]
        (workdir / "result.json").write_text(json.dumps({"ranks": meta, "problems": problems}))


def main() -> None:
    rank, world, workdir, scenario = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    if sys.argv[5:] == ["side"]:
        distributed._is_gloo = lambda backend: False  # as under NCCL: a gloo side group carries the commands
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    if scenario == "noblock":
        noblock(rank, world, workdir)
        dist.barrier()
        dist.destroy_process_group()
        return
    if scenario == "monitor":
        monitor_scenario(rank, world, workdir)
        dist.barrier()
        dist.destroy_process_group()
        return
    if scenario == "buffer":
        buffer_scenario(rank, world, workdir)
        dist.destroy_process_group()
        return
    if scenario == "close":
        close_scenario(rank, world, workdir)
        dist.destroy_process_group()
        return
    torch.manual_seed(0)  # same init on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + 0.05 * e))
    ckpt = Checkpointer(workdir / f"rank{rank}", model=ddp, optimizer=optimizer, scheduler=scheduler, good_window=1)
    remediator = Remediator(optimizer, scheduler, ckpt)
    interval = 4 if scenario == "interval" else 1
    coordinator = StepCoordinator(interval=interval, resolve=remediator.resolve)
    side_group = coordinator._channel is not None
    torch.manual_seed(100 + rank)  # different data on every rank
    random.seed(rank)

    if scenario == "cost":
        # time spent inside exchange() per step, with a 2 ms "step" (sleep) between calls
        n = 200
        for step in range(20):  # warm up the collective
            coordinator.exchange(step, [])
        inside = 0.0
        for step in range(n):
            time.sleep(0.002)
            start = time.perf_counter()
            coordinator.exchange(step, [])
            inside += time.perf_counter() - start
        per_call = inside / n
        coordinator.close()
        if rank == 0:
            (workdir / "result.json").write_text(json.dumps({"seconds_per_exchange": per_call, "world": world}))
        dist.barrier()
        dist.destroy_process_group()
        return

    applied = []
    issued = []
    for step in range(1, 19):
        x = torch.randn(16, 8)
        loss = torch.nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step in (3, 6):
            ckpt.save(step)
        ckpt.note_step(step, True)
        local = []
        if rank == 0 and step == 7:
            # the sidecar saw a spike at 7: only rank 0 knows, so only rank 0 rejects checkpoint 6
            ckpt.note_incident(7)
        if rank == 0 and step in ISSUES[scenario]:
            kind, args = ISSUES[scenario][step]
            local.append(Action(kind, dict(args), source="sidecar"))
            issued.append([kind, step])
        if rank == world - 1 and rank != 0 and step == 11:
            local.append(Action("stop"))  # issued off rank 0: must not be applied anywhere
        for action in coordinator.exchange(step, local):
            result = remediator.apply(action, step)
            applied.append([action.kind, action.args, result.outcome, result.step, result.data.get("restored_step")])
        if step == 12:
            mid = snapshot(model, optimizer)
    final = snapshot(model, optimizer)
    lost = coordinator.close()
    meta = gather_json({"applied": applied, "stop": remediator.stop_requested, "dropped": coordinator.dropped,
                        "lost": len(lost), "late_waits": coordinator.late_waits,
                        "late_wait_s": coordinator.late_wait_seconds}, world)
    mids, finals = gather_snapshot(mid, world), gather_snapshot(final, world)
    gathered = [dict(m, mid=mi, final=fi) for m, mi, fi in zip(meta, mids, finals)]
    if rank == 0:
        problems = []
        for other_rank, other in enumerate(gathered):
            if other["applied"] != applied:
                problems.append(f"rank {other_rank} applied {other['applied']} != {applied}")
            problems += [f"rank {other_rank} mid {p}" for p in same(gathered[0]["mid"], other["mid"])]
            problems += [f"rank {other_rank} final {p}" for p in same(gathered[0]["final"], other["final"])]
        (workdir / "result.json").write_text(json.dumps({
            "problems": problems,
            "issued": issued,
            "applied": applied,
            "side_group": side_group,
            "stop": [g["stop"] for g in gathered],
            "dropped": [g["dropped"] for g in gathered],
            "lost": [g["lost"] for g in gathered],
            "late_waits": [g["late_waits"] for g in gathered],
            "late_wait_s": [g["late_wait_s"] for g in gathered],
            "lrs": final["lrs"],
            "steps": [int(s) for s in final["step"]],
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
    # Results are written and the process group is destroyed. Skip interpreter teardown:
    # torch's gloo threads occasionally abort it ("terminate called without an active
    # exception"; seen about 1 run in 15 on 2 busy cores, with the old blocking coordinator too).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
