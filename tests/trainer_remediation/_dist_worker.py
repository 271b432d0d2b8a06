"""One rank of the gloo tests: train a small DDP model, remediate on rank 0 only.

argv: rank world_size workdir scenario   (scenario: "ladder" | "interval" | "cost")
Rank 0 writes workdir/result.json with what it compared.
"""

from __future__ import annotations

import json
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adamwatch.checkpoint import Checkpointer
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


def main() -> None:
    rank, world, workdir, scenario = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    torch.manual_seed(0)  # same init on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + 0.05 * e))
    ckpt = Checkpointer(workdir / f"rank{rank}", model=ddp, optimizer=optimizer, scheduler=scheduler, good_window=1)
    remediator = Remediator(optimizer, scheduler, ckpt)
    interval = 4 if scenario == "interval" else 1
    coordinator = StepCoordinator(interval=interval, resolve=remediator.resolve)
    torch.manual_seed(100 + rank)  # different data on every rank
    random.seed(rank)

    if scenario == "cost":
        n = 300
        for step in range(20):  # warm up the collective
            coordinator.exchange(step, [])
        start = time.perf_counter()
        for step in range(n):
            coordinator.exchange(step, [])
        per_call = (time.perf_counter() - start) / n
        if rank == 0:
            (workdir / "result.json").write_text(json.dumps({"seconds_per_exchange": per_call, "world": world}))
        dist.barrier()
        dist.destroy_process_group()
        return

    applied = []
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
        if rank == 0 and step == 5:
            local.append(Action("reduce_lr", {"factor": 0.5}, source="sidecar"))
        if rank == 0 and step == 9:
            local.append(Action("restore_checkpoint", {"step": None}, source="sidecar"))
        if rank == world - 1 and rank != 0 and step == 11:
            local.append(Action("stop"))  # issued off rank 0: must not be applied anywhere
        for action in coordinator.exchange(step, local):
            result = remediator.apply(action, step)
            applied.append([action.kind, action.args, result.outcome, result.step, result.data.get("restored_step")])
        if step == 12:
            mid = snapshot(model, optimizer)
    final = snapshot(model, optimizer)
    meta = gather_json({"applied": applied, "stop": remediator.stop_requested, "dropped": coordinator.dropped}, world)
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
            "applied": applied,
            "stop": [g["stop"] for g in gathered],
            "dropped": [g["dropped"] for g in gathered],
            "lrs": final["lrs"],
            "steps": [int(s) for s in final["step"]],
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
