"""How runs end, evaluation and footprint (issue 11 items 1, 2, 3, 6): real trainer processes, a real sidecar.

Each trainer process ends in one way (clean, exception in a ``with`` block,
uncaught OOM, SIGTERM, SIGKILL); /metrics must show exactly that exit reason
and run outcome, and the trainer's exit status must be what it would be
without adamwatch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from .conftest import SidecarProcess

pytestmark = pytest.mark.slow

TRAINER = os.path.join(os.path.dirname(__file__), "_run_end_trainer.py")
REASONS = ("clean", "exception", "oom", "preemption", "signal", "vanished")


@pytest.fixture
def run_sidecar(workdir):
    config = os.path.join(workdir, "sidecar.yaml")
    with open(config, "w") as fh:
        yaml.safe_dump({"runs": {"vanish_grace_seconds": 0.5},
                        "convergence": {"sample_interval_seconds": 0}}, fh)
    proc = SidecarProcess(workdir, "--config", config)
    proc.start()
    yield proc
    proc.stop()


def _spawn(mode: str, sidecar: SidecarProcess, job: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAINER, mode, sidecar.endpoint, job], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _exits(sidecar: SidecarProcess, job: str) -> dict[str, float]:
    return {r: sidecar.value("adamwatch_trainer_exits_total", job=job, rank="0", reason=r) for r in REASONS}


@pytest.mark.parametrize(
    "mode, reason, outcome, returncode, exception",
    [
        ("clean", "clean", "success", 0, None),
        ("no-close", "clean", "success", 0, None),
        ("exception", "exception", "crashed", 1, "ValueError"),
        ("oom", "oom", "oom", 1, "OutOfMemoryError"),
        ("sigterm", "preemption", "preempted", -signal.SIGTERM, None),
        # the script handles SIGTERM itself and finishes cleanly: still one exit, preemption
        ("sigterm-handled", "preemption", "preempted", 0, None),
    ],
)
def test_each_way_a_run_ends_is_counted_once_by_reason(run_sidecar, mode, reason, outcome, returncode,
                                                       exception) -> None:
    job = f"end-{mode}"
    proc = _spawn(mode, run_sidecar, job)
    _, err = proc.communicate(timeout=60)
    # adamwatch changes nothing about how the process dies
    assert proc.returncode == returncode, err[-2000:]
    if exception:
        assert exception in err  # the original traceback still printed
    run_sidecar.wait_value("adamwatch_trainer_exits_total", lambda v: v == 1, job=job, rank="0", reason=reason)
    assert _exits(run_sidecar, job) == {r: (1.0 if r == reason else 0.0) for r in REASONS}
    assert run_sidecar.value("adamwatch_runs_ended_total", job=job, rank="0", outcome=outcome) == 1
    assert run_sidecar.value("adamwatch_runs_ended_total", job=job, rank="0", outcome="nonfinite") == 0
    assert run_sidecar.value("adamwatch_trainer_starts_total", job=job, rank="0") == 1
    if exception:
        assert run_sidecar.value("adamwatch_trainer_exception_exits_total", job=job, rank="0",
                                 exception=exception) == 1


def test_a_killed_trainer_vanishes_and_a_restart_counts_a_second_start(run_sidecar) -> None:
    job = "end-sigkill"
    proc = _spawn("sigkill", run_sidecar, job)
    assert proc.stdout.readline().strip() == "READY"
    run_sidecar.wait_value("adamwatch_trainer_starts_total", lambda v: v == 1, job=job, rank="0")
    assert _exits(run_sidecar, job)["vanished"] == 0  # still alive: nothing counted
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    run_sidecar.wait_value("adamwatch_trainer_exits_total", lambda v: v == 1, job=job, rank="0", reason="vanished")
    assert run_sidecar.value("adamwatch_runs_ended_total", job=job, rank="0", outcome="crashed") == 1
    # the same job again, ending cleanly: a second start, the vanished count stays
    again = _spawn("clean", run_sidecar, job)
    again.communicate(timeout=60)
    run_sidecar.wait_value("adamwatch_trainer_exits_total", lambda v: v == 1, job=job, rank="0", reason="clean")
    assert run_sidecar.value("adamwatch_trainer_starts_total", job=job, rank="0") == 2
    assert _exits(run_sidecar, job)["vanished"] == 1


def test_evaluations_target_footprint_and_model_family_reach_metrics(run_sidecar) -> None:
    job = "eval-run"
    proc = _spawn("eval", run_sidecar, job)
    assert proc.stdout.readline().strip() == "READY"
    labels = {"job": job, "rank": "0"}
    run_sidecar.wait_value("adamwatch_evaluations_total", lambda v: v == 4, **labels)
    assert run_sidecar.value("adamwatch_eval_metric", metric="loss", **labels) == pytest.approx(0.4)
    assert run_sidecar.value("adamwatch_eval_metric", metric="accuracy", **labels) == pytest.approx(0.8)
    assert run_sidecar.value("adamwatch_eval_step", **labels) == 9  # 5 steps, then one per evaluation
    assert run_sidecar.value("adamwatch_eval_overfitting_streak", **labels) == 0
    assert run_sidecar.value("adamwatch_convergence_target", metric="eval_loss", **labels) == 0.5
    assert run_sidecar.value("adamwatch_convergence_reached_step", metric="eval_loss", **labels) == 9
    assert run_sidecar.value("adamwatch_convergence_reached_seconds", metric="eval_loss", **labels) >= 0
    assert run_sidecar.value("adamwatch_convergence_eta_steps", metric="eval_loss", **labels) == 0
    assert run_sidecar.value("adamwatch_run_info", model_family="linear", **labels) == 1
    # Linear(8, 1): 8 + 1 float32 parameters; AdamW state: m and v (float32) and a float32 step per param
    run_sidecar.wait_value("adamwatch_optimizer_state_bytes", lambda v: v > 0, dtype="float32", **labels)
    assert run_sidecar.value("adamwatch_param_bytes", dtype="float32", **labels) == 9 * 4
    assert run_sidecar.value("adamwatch_optimizer_state_bytes", dtype="float32", **labels) == (2 * 9 + 2) * 4
    assert run_sidecar.value("adamwatch_device_memory_peak_bytes", **labels) is None  # CPU: absent
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0
    run_sidecar.wait_value("adamwatch_runs_target_total", lambda v: v == 1, outcome="reached", **labels)
    assert run_sidecar.value("adamwatch_runs_target_total", outcome="missed", **labels) == 0
    assert run_sidecar.value("adamwatch_trainer_device_seconds_total", device="cpu", **labels) > 0
