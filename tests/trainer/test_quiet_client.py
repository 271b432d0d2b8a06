"""The client thread sleeps when there is nothing to send, and a flooding sidecar cannot slow training.

Issue 15 ("a quiet client"): an idle trainer's client thread must not wake on a
timer and take the GIL from the training thread. Issue 10 (finding 11): the
commands applied per step are bounded and overflowing control frames (ACKs) are
counted, never silently dropped.
"""

from __future__ import annotations

import os
import time

from adamwatch import wire
import adamwatch
from adamwatch.client import MAX_CONTROL_FRAMES, StreamClient, Wakeup

from .test_monitor_actions import train
from .test_monitor import make_model, make_optimizer


def test_wakeup_is_seen_by_select_once_and_never_written_after_close():
    import select

    w = Wakeup()
    assert w.arm()  # the client is about to sleep on the pipe
    assert select.select([w], [], [], 0)[0] == []
    w.set()
    w.set()  # already pending: no second write
    assert w.wakeups == 1
    assert select.select([w], [], [], 0)[0] == [w]
    w.disarm()
    w.clear()
    assert select.select([w], [], [], 0)[0] == []
    assert w.arm()
    w.set()
    assert w.wakeups == 2
    w.disarm()
    w.clear()
    w.close()
    w.arm()
    w.set()  # must not write into a descriptor number another file may now hold
    assert w.wakeups == 2


def test_a_wakeup_while_the_client_is_not_sleeping_on_the_pipe_makes_no_system_call():
    """While the client batches (asleep on its socket, or busy), set() only raises the flag;
    arm() then sees the work and the client does not sleep."""
    import select

    w = Wakeup()
    w.set()
    assert w.wakeups == 0 and w.pending
    assert select.select([w], [], [], 0)[0] == []  # nothing in the pipe
    assert not w.arm()  # work is pending: no sleep
    w.clear()
    assert not w.pending and w.arm()
    w.set()  # now the client sleeps on the pipe: one byte
    assert w.wakeups == 1 and select.select([w], [], [], 0)[0] == [w]
    w.disarm()
    w.clear()
    assert select.select([w], [], [], 0)[0] == []  # drained by the clear
    w.urgent()  # not armed, yet written: the client's pause watches the pipe for this
    assert w.pending and w.wakeups == 2 and select.select([w], [], [], 0)[0] == [w]
    w.clear()
    assert select.select([w], [], [], 0)[0] == []


def test_a_busy_trainers_steps_write_nothing_into_the_wakeup_pipe(sink):
    """Fast steps while the client paces: the summaries are found by flag, not by a byte
    written from the step path (a system call per client turn on the training thread)."""
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint) as monitor:
        train(model, opt, None, monitor, 5)
        sink.wait_for(lambda: len(sink.steps()) == 5)
        time.sleep(0.3)  # the client is idle now, asleep on the pipe
        wakeups, turns = monitor._client._wakeup.wakeups, monitor._client.turns
        for i in range(5, 105):  # about a second of 10 ms steps: ten client turns or so
            train(model, opt, None, monitor, 1, start=i)
            time.sleep(0.01)
        sink.wait_for(lambda: len(sink.steps()) == 105, timeout=10)
        during, turns = monitor._client._wakeup.wakeups - wakeups, monitor._client.turns - turns
    # The first summary wakes the idle client (one byte); the rest land while it
    # paces or works. The old Wakeup wrote once per client turn.
    assert turns >= 5, turns
    assert during <= 2, (during, turns)


def test_an_idle_trainer_client_does_not_tick(sink):
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint) as monitor:
        train(model, opt, None, monitor, 3)
        sink.wait_for(lambda: len(sink.steps()) == 3)
        time.sleep(0.2)  # let the turn that sent them finish
        client = monitor._client
        before = client.turns
        time.sleep(1.0)
        idle_turns = client.turns - before
        # A step still reaches the sidecar at once after the idle second.
        train(model, opt, None, monitor, 1, start=3)
        sink.wait_for(lambda: len(sink.steps()) == 4, timeout=2.0)
    # The old loop woke every 50 ms: 20 turns in this second.
    assert idle_turns <= 1, idle_turns


def test_fast_steps_stay_batched_after_pauses(sink):
    """Bursts of fast steps between one-second pauses (evaluations, a slow loader): each
    burst costs a couple of client turns, not one per step, and every step arrives."""
    model = make_model()
    opt = make_optimizer(model)
    bursts, per_burst = 3, 12
    with adamwatch.watch(opt, endpoint=sink.endpoint) as monitor:
        turns_in_bursts = 0
        for b in range(bursts):
            time.sleep(1.0)  # the pause: the client goes idle
            before = monitor._client.turns
            started = time.monotonic()
            train(model, opt, None, monitor, per_burst, start=b * per_burst)
            sink.wait_for(lambda b=b: len(sink.steps()) == (b + 1) * per_burst, timeout=5)
            burst_s = time.monotonic() - started
            turns_in_bursts += monitor._client.turns - before
    # One turn at once for the burst's first summary, then one per 100 ms pause.
    # A smoothed step time used to gate the batching: after a one-second pause it
    # read "slow steps" for about ten steps, each then a wake-up of its own.
    allowed = bursts * (2 + int(burst_s / 0.1) + 1)
    assert turns_in_bursts <= allowed, (turns_in_bursts, allowed)
    assert turns_in_bursts < bursts * per_burst / 2


def test_a_command_wakes_an_idle_client(sink):
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint) as monitor:
        train(model, opt, None, monitor, 2)
        sink.wait_for(lambda: len(sink.steps()) == 2)
        time.sleep(0.3)
        turns = monitor._client.turns
        sink.send_command({"id": "c1", "action": "reduce_lr", "args": {"factor": 0.5}, "reason": "t", "step": 2})
        # Read without any step: the socket, not a timer or a summary, woke the thread.
        deadline = time.monotonic() + 2.0
        while monitor._actions.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not monitor._actions.empty()
        assert monitor._client.turns - turns <= 2
        train(model, opt, None, monitor, 1, start=2)
        sink.wait_for(lambda: sink.of_type(wire.MessageType.ACK), timeout=2.0)
    assert sink.of_type(wire.MessageType.ACK)[0]["outcome"] == "applied"
    assert monitor.lr_scale == 0.5


def test_a_frame_sent_from_another_thread_wakes_a_sleeping_client(sink):
    """StreamClient.send() from a thread other than the client's (no poll callback) must not wait for a timer."""
    from tests.sidecar.sidecar_testlib import hello_payload

    client = StreamClient(sink.endpoint, lambda: hello_payload(job="t"))
    client.start()
    try:
        sink.wait_for(lambda: sink.of_type(wire.MessageType.HELLO), timeout=5)
        time.sleep(0.3)  # the thread has gone to sleep: nothing to send
        client.send(wire.encode_frame(wire.MessageType.DROPPED, {"dropped_total": 0}))
        sink.wait_for(lambda: sink.of_type(wire.MessageType.DROPPED), timeout=2)  # the idle sleep is 30 s
    finally:
        client.close()


def test_control_frames_beyond_the_bound_are_counted(short_dir):
    errors: list[str] = []
    client = StreamClient(f"unix://{os.path.join(short_dir, 'nobody.sock')}", lambda: {}, on_error=errors.append)
    frame = wire.encode_frame(wire.MessageType.DROPPED, {"dropped_total": 1})
    for _ in range(MAX_CONTROL_FRAMES + 76):
        client.send_control(frame)
    assert client.control_dropped == 76
    assert errors == ["control_queue_full"] * 76
    assert len(client._control) == MAX_CONTROL_FRAMES


def test_a_command_flood_is_bounded_per_step_and_every_command_is_answered(sink):
    """5,000 valid commands from a hostile sidecar: at most 64 wait, at most 32 apply per step, all answered."""
    from adamwatch.monitor import Monitor

    n = 5000
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        train(model, opt, None, monitor, 1)
        sink.wait_for(lambda: sink.steps())
        flood = b"".join(
            wire.encode_frame(wire.MessageType.COMMAND,
                              {"id": f"f{i}", "action": "reduce_lr", "args": {"factor": 0.999}, "reason": "flood"},
                              validate=True)
            for i in range(n))
        conn = sink.connections[-1]
        conn.settimeout(60)  # the sink's 0.2 s read timeout would fail a send that waits for the trainer to read
        conn.sendall(flood)
        conn.settimeout(0.2)
        deadline = time.monotonic() + 20
        while monitor.commands_refused + monitor._actions.qsize() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert monitor._actions.qsize() == Monitor._MAX_PENDING_COMMANDS
        assert monitor.commands_refused == n - Monitor._MAX_PENDING_COMMANDS
        train(model, opt, None, monitor, 3, start=1)
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE), timeout=10)
    acks = sink.of_type(wire.MessageType.ACK)
    steps_applied_at = [a["step"] for a in acks if a["outcome"] == "applied"]
    per_step = {s: steps_applied_at.count(s) for s in set(steps_applied_at)}
    assert per_step and max(per_step.values()) <= 2 * Monitor._MAX_ACTIONS_PER_BOUNDARY, per_step
    # Every command is answered (applied, refused, or closed before its boundary) or its answer is counted.
    assert len(acks) + monitor._client.control_dropped == n
    assert monitor.errors_by_where["command_queue_full"] == n - Monitor._MAX_PENDING_COMMANDS
    assert monitor.errors_by_where.get("control_queue_full", 0) == monitor._client.control_dropped


def test_goodbye_is_the_last_frame_after_summaries_still_being_batched(sink):
    # Steps finished within the client's batching pause are still in the
    # transfer pipe at close(): they must reach the sidecar before the GOODBYE,
    # which makes the sidecar judge the run's end (found by CI: the last two
    # steps of a run arrived after its GOODBYE).
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        train(model, opt, None, monitor, 20)
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
    time.sleep(0.2)  # anything sent after the GOODBYE would have arrived by now
    kinds = [m.type for m in list(sink.messages)]
    assert kinds[-1] == wire.MessageType.GOODBYE, kinds[-5:]
    assert [s["step"] for s in sink.steps()] == list(range(1, 21))


def test_summaries_near_the_transfer_bound_wake_the_client_from_its_pause(sink):
    """Steps faster than the bound allows per pause: half the bound in flight wakes the client
    at once (an urgent wake-up, watched even while it pauses), and no summary is dropped. A
    two-second pause makes the burst overflow unless that wake-up works; the same burst without
    it drops summaries (the control)."""
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, batch_interval=2.0) as monitor:
        transfer = monitor._transfer
        transfer.capacity = 128  # reach the bound with a short burst of the tests' tiny model
        train(model, opt, None, monitor, 2)
        sink.wait_for(lambda: len(sink.steps()) == 2, timeout=10)
        train(model, opt, None, monitor, 300, start=2)
        sink.wait_for(lambda: len(sink.steps()) == 302, timeout=15)
        assert transfer.dropped == 0
        assert monitor._client._wakeup.wakeups >= 2  # the burst's urgent wake-ups

        transfer.on_backlog = None  # the control: the client collects only at the end of each pause
        time.sleep(0.3)
        train(model, opt, None, monitor, 300, start=302)
        steps = [s["step"] for s in sink.steps()]
    assert transfer.dropped > 0, "the control burst must overflow the bound, or the test shows nothing"
    assert steps[:302] == list(range(1, 303))
