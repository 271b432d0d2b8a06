"""The step history: exact values, cursors, downsampling, and the memory bound with many trainers."""

from __future__ import annotations

import math
import struct
import tracemalloc

import pytest

from adamwatch import wire
from adamwatch_sidecar.status_page.history import (
    BUCKET_COLUMNS,
    STEP_COLUMNS,
    HistoryLimits,
    StepHistory,
)

from tests.sidecar.sidecar_testlib import deep_entry, hello_payload, step_payload

KEY = ("gpt", 0)
HELLO = wire.MessageType.HELLO
STEP = wire.MessageType.STEP


def feed(history: StepHistory, key=KEY, steps=range(1, 11), groups=None, **extra):
    history.on_message(key, wire.Message(HELLO, hello_payload(job=key[0], rank=key[1], groups=groups)))
    for step in steps:
        history.on_message(key, wire.Message(STEP, step_payload(step, loss=1.0 + step, **extra)))


def rows(read, width=None):
    """The read's full-resolution rows as dicts."""
    width = read.width
    values = struct.unpack(f"{len(read.steps) // 8}d", read.steps)
    out = []
    for i in range(0, len(values), width):
        row = dict(zip(STEP_COLUMNS, values[i:i + len(STEP_COLUMNS)]))
        row["lr"] = list(values[i + len(STEP_COLUMNS):i + width])
        out.append(row)
    return out


def buckets(read):
    values = struct.unpack(f"{len(read.buckets) // 8}d", read.buckets)
    width = read.bucket_width
    return [values[i:i + width] for i in range(0, len(values), width)]


def test_every_step_is_kept_exactly_with_flags_groups_and_deep_statistics():
    history = StepHistory()
    history.on_message(KEY, wire.Message(HELLO, hello_payload()))
    history.on_message(KEY, wire.Message(STEP, step_payload(1, loss=2.25, samples=32, tokens=4096)))
    history.on_message(KEY, wire.Message(STEP, step_payload(2, loss=None, loss_nonfinite=True, grad_norm=None,
                                                            grad_nonfinite=True, skipped=True, skip_reason="guard")))
    history.on_message(KEY, wire.Message(STEP, step_payload(3, lr=[2e-3, 1e-3], deep=[deep_entry(1.0), deep_entry(2.0)])))
    read = history.read(KEY)
    assert (read.first_seq, read.last_seq, read.groups) == (1, 3, ("decay", "no_decay"))
    got = rows(read)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[0]["loss"] == 2.25 and got[0]["samples"] == 32 and got[0]["tokens"] == 4096 and got[0]["flags"] == 0
    assert math.isnan(got[1]["loss"]) and math.isnan(got[1]["grad_norm"]) and got[1]["flags"] == 3
    assert math.isnan(got[2]["samples"]) and got[2]["lr"] == [2e-3, 1e-3] and got[2]["time"] == 1_700_000_003.0
    deep = struct.unpack(f"{read.deep_width}d", read.deep)
    assert deep[:3] == (3, 3, 1_700_000_003.0)
    assert deep[3:8] == (1.0, 2.0, 3.0, 4.0, 5.0) and deep[8:13] == (0.1, 0.2, 0.3, 0.4, 0.5) and deep[13] == 0.001
    assert deep[14:19] == (2.0, 4.0, 6.0, 8.0, 10.0)  # second group


def test_a_cursor_returns_only_newer_steps_and_a_foreign_cursor_returns_everything():
    history = StepHistory()
    feed(history, steps=range(1, 21), deep=None)
    first = history.read(KEY)
    feed_more = [wire.Message(STEP, step_payload(s, loss=float(s))) for s in (21, 22)]
    for message in feed_more:
        history.on_message(KEY, message)
    newer = history.read(KEY, since=first.last_seq, epoch=first.epoch)
    assert [r["step"] for r in rows(newer)] == [21, 22] and newer.since == 20
    assert newer.buckets is not None  # no buckets_version given: they come along (empty)
    assert history.read(KEY, since=22, epoch=first.epoch).steps == b""
    assert history.read(KEY, since=5, epoch="another-sidecar").step_rows() == 22
    assert history.read(KEY, since=999).step_rows() == 22  # a cursor from the future is void too
    assert history.read(("nobody", 0)) is None


def test_beyond_the_window_steps_are_folded_into_buckets_whose_means_and_maxima_are_exact():
    history = StepHistory(HistoryLimits(steps=100, downsampled_points=4))
    history.on_message(KEY, wire.Message(HELLO, hello_payload(groups=["g"])))
    sent = []
    for step in range(1, 401):
        loss = math.nan if step == 7 else 1.0 + (step % 13)
        flags = {"skipped": True, "skip_reason": "guard"} if step in (7, 8) else {}
        history.on_message(KEY, wire.Message(STEP, step_payload(step, loss=None if step == 7 else loss,
                                                                loss_nonfinite=step == 7, group_grad_norms=[1.0],
                                                                grad_norm=float(step), lr=[step * 1e-4], **flags)))
        sent.append((step, loss, float(step), step * 1e-4, step in (7, 8), step == 7))
    read = history.read(KEY)
    assert read.plan.steps == 100
    kept = rows(read)
    assert 90 <= len(kept) <= 100 and kept[-1]["step"] == 400  # folds a tenth at a time
    assert read.first_seq == 400 - len(kept) + 1 == kept[0]["step"]
    got = buckets(read)
    assert 2 <= len(got) <= 4
    col = {name: i for i, name in enumerate(BUCKET_COLUMNS)}
    # Buckets cover consecutive steps from 1 to first_seq - 1, with exact aggregates.
    start = 1
    for b in got:
        end = int(b[col["seq"]])
        span = sent[start - 1:end]
        assert b[col["steps"]] == len(span) and b[col["step"]] == end
        finite_losses = [loss for _, loss, *_ in span if not math.isnan(loss)]
        assert b[col["loss_max"]] == max(finite_losses)
        assert b[len(BUCKET_COLUMNS)] == pytest.approx(sum(finite_losses))  # loss sum
        assert b[len(BUCKET_COLUMNS) + 1] == len(finite_losses)  # loss count (NaN left out)
        assert b[col["grad_norm_max"]] == end
        assert b[col["time_sum"]] == pytest.approx(sum(1_700_000_000.0 + s for s, *_ in span))
        assert b[col["skipped"]] == sum(1 for *_, skipped, _ in span if skipped)
        assert b[col["nonfinite"]] == sum(1 for *_, nonfinite in span if nonfinite)
        assert b[-2] == pytest.approx(sum(lr for _, _, _, lr, *_ in span))  # the group's lr sum
        start = end + 1
    assert start == read.first_seq
    assert read.bucket_steps > 1 and read.buckets_version > 0


def test_buckets_are_only_copied_when_they_changed():
    history = StepHistory(HistoryLimits(steps=50))
    feed(history, steps=range(1, 121))
    read = history.read(KEY)
    again = history.read(KEY, since=read.last_seq, epoch=read.epoch, buckets_version=read.buckets_version)
    assert again.buckets is None and again.steps == b""


def test_many_trainers_share_the_total_and_a_departure_gives_memory_back():
    limits = HistoryLimits(steps=1000, total_bytes=200_000, trainer_bytes=150_000)
    history = StepHistory(limits)
    feed(history, ("a", 0), steps=range(1, 1201))
    alone = history.read(("a", 0))
    assert alone.plan.steps == 1000 and alone.step_rows() > 900
    feed(history, ("b", 0), steps=range(1, 3))
    feed(history, ("c", 0), steps=range(1, 3))
    shared = history.read(("a", 0))
    assert shared.plan.steps < alone.plan.steps
    assert shared.step_rows() <= shared.plan.steps  # shrunk at once, not at its next step
    assert history.nbytes() <= limits.total_bytes
    assert history.retain([("a", 0)]) == [("b", 0), ("c", 0)]
    assert history.read(("a", 0)).plan.steps == alone.plan.steps


@pytest.mark.slow
def test_the_memory_bound_holds_for_a_thousand_trainers_measured_by_tracemalloc():
    limits = HistoryLimits()
    history = StepHistory(limits)
    trainers = [("job", rank) for rank in range(1000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for key in trainers:
            history.on_message(key, wire.Message(HELLO, hello_payload(job="job", rank=key[1])))
        steps = limits.plan(len(trainers), 2, 10).steps + 60  # every window full and folded once
        deep = [deep_entry(), deep_entry()]
        for step in range(1, steps + 1):
            payload = step_payload(step, deep=deep if step % 10 == 0 else None)
            message = wire.Message(STEP, payload)
            for key in trainers:
                history.on_message(key, message)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    held = history.nbytes()
    per_trainer_overhead = 2048  # the track object, its structs, dict entry
    print(f"\n1000 trainers x {steps} steps: buffers {held / 2**20:.1f} MiB, traced {used / 2**20:.1f} MiB, "
          f"bound {limits.total_bytes / 2**20:.0f} MiB")
    assert held <= limits.total_bytes * 8 // 9
    assert used <= limits.total_bytes + per_trainer_overhead * len(trainers)
    read = history.read(trainers[0])
    assert read.step_rows() >= limits.min_steps and read.bucket_rows() > 0


def test_one_trainer_keeps_ten_thousand_steps_by_default():
    plan = HistoryLimits().plan(1, 2, 10)
    assert plan.steps == 10_000 and plan.deep_rows == 1001
    assert HistoryLimits.plan_bytes(plan, 2) <= HistoryLimits().trainer_bytes


def test_groups_beyond_the_charted_limit_are_left_out_and_a_hello_without_names_uses_indices():
    history = StepHistory(HistoryLimits(max_groups=2))
    feed(history, groups=["a", "b", "c"], steps=[1], lr=[1.0, 2.0, 3.0], group_grad_norms=[1.0, 1.0, 1.0])
    assert history.read(KEY).groups == ("a", "b") and rows(history.read(KEY))[0]["lr"] == [1.0, 2.0]
    # A STEP before any HELLO (the page was attached late): the first STEP fixes the layout.
    history.on_message(("late", 3), wire.Message(STEP, step_payload(5)))
    late = history.read(("late", 3))
    assert late.groups == ("0", "1") and rows(late)[0]["lr"] == [1e-3, 5e-4]


def test_a_new_layout_resets_the_history_and_a_reconnect_keeps_it():
    history = StepHistory()
    feed(history, steps=range(1, 6))
    epoch = history.read(KEY).epoch
    feed(history, steps=range(6, 8))  # HELLO again, same groups: the curve continues
    assert history.read(KEY).epoch == epoch and history.read(KEY).step_rows() == 7
    feed(history, steps=[1], groups=["only"], lr=[1e-3], group_grad_norms=[1.0])
    assert history.read(KEY).epoch != epoch and history.read(KEY).step_rows() == 1


@pytest.mark.parametrize("field, value", [("steps", 0), ("total_bytes", -1), ("max_groups", 1.5),
                                          ("downsampled_points", 1), ("min_steps", True)])
def test_limits_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        HistoryLimits(**{field: value})


def test_the_module_example_runs():
    import doctest

    from adamwatch_sidecar.status_page import history as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
