"""Issue 10 finding 6: a restore that fails changes nothing; one that succeeds changes everything.

Every case damages one part of a checkpoint so that its checksum still matches
(the failure is found only by loading or checking it), then compares every
parameter and buffer, m, v, step counts, param groups, scheduler, GradScaler and
the torch, random and numpy RNG states before and after the failed restore.
Today's code overwrote the model (and more) before the bad part failed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from adamwatch.checkpoint import Checkpointer, NoUsableCheckpointError

from ._checkpoints import Events, assert_unchanged, live_state, setup
from ._training import make_model, make_optimizer, train_steps


def _rewrite(folder: Path, name: str, payload: Any) -> None:
    """Replace one data file and fix its manifest entry, so only loading or checking can tell."""
    if isinstance(payload, bytes):
        data = payload
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _load(folder: Path, name: str) -> Any:
    return torch.load(folder / name, weights_only=True)


def _wider_model_state(folder: Path) -> dict:
    return make_model(seed=3, width=32).state_dict()


def _optimizer_with_wrong_moment_shape(folder: Path) -> dict:
    state = _load(folder, "optimizer.pt")
    state["state"][0]["exp_avg"] = torch.zeros(3, 3)
    return state


def _optimizer_with_a_missing_param(folder: Path) -> dict:
    state = _load(folder, "optimizer.pt")
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    return state


def _optimizer_state_for_unknown_param(folder: Path) -> dict:
    state = _load(folder, "optimizer.pt")
    state["state"][17] = dict(state["state"][0])
    return state


def _trainer_with_bad_torch_rng(folder: Path) -> dict:
    state = _load(folder, "trainer.pt")
    state["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    return state


def _trainer_with_bad_python_rng(folder: Path) -> dict:
    state = _load(folder, "trainer.pt")
    state["rng"]["python"] = [3, [1, 2, 3], None]
    return state


def _trainer_without_scheduler(folder: Path) -> dict:
    state = _load(folder, "trainer.pt")
    state["scheduler"] = None
    return state


def _trainer_with_two_group_scheduler(folder: Path) -> dict:
    state = _load(folder, "trainer.pt")
    state["scheduler"]["base_lrs"] = state["scheduler"]["base_lrs"] * 2
    return state


def _trainer_with_infinite_scale(folder: Path) -> dict:
    state = _load(folder, "trainer.pt")
    state["scaler"]["scale"] = float("inf")
    return state


DAMAGE: dict[str, tuple[str, Callable[[Path], Any], str]] = {
    # case: (file, new content, what the corrupt event's detail names)
    "optimizer file unloadable": ("optimizer.pt", lambda f: b"checksum matches, torch cannot load it",
                                  "optimizer.pt could not be loaded"),
    "model of another shape": ("model.pt", _wider_model_state, "the live model's (16, 8)"),
    "model with a missing key": ("model.pt", lambda f: {k: v for k, v in _load(f, "model.pt").items() if k != "3.bias"},
                                 "missing ['3.bias']"),
    "moment of another shape": ("optimizer.pt", _optimizer_with_wrong_moment_shape, "exp_avg of parameter 0"),
    "param group one param short": ("optimizer.pt", _optimizer_with_a_missing_param, "param group 0 has 3 parameters"),
    "state for an unknown param": ("optimizer.pt", _optimizer_state_for_unknown_param, "parameter id 17"),
    "torch RNG state garbage": ("trainer.pt", _trainer_with_bad_torch_rng, "rng state does not load"),
    "python RNG state garbage": ("trainer.pt", _trainer_with_bad_python_rng, "rng state does not load"),
    "no scheduler state": ("trainer.pt", _trainer_without_scheduler, "no scheduler state"),
    "scheduler of two groups": ("trainer.pt", _trainer_with_two_group_scheduler, "scheduler base_lrs"),
    "GradScaler scale infinite": ("trainer.pt", _trainer_with_infinite_scale, "GradScaler scale"),
}


def _run_with_checkpoint_at_3(directory: Path, **kwargs):
    torch.manual_seed(0); random.seed(0)
    model, optimizer, scheduler, scaler = setup()
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, **kwargs)
    train_steps(model, optimizer, scheduler, scaler, steps=3)
    ckpt.save(3)
    train_steps(model, optimizer, scheduler, scaler, steps=3)  # the live state moves on
    return ckpt, model, optimizer, scheduler, scaler


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_failed_restore_changes_nothing(tmp_path: Path, case: str) -> None:
    name, content, reason = DAMAGE[case]
    events = Events()
    ckpt, model, optimizer, scheduler, scaler = _run_with_checkpoint_at_3(tmp_path, on_event=events)
    folder = tmp_path / "step-000000000003"
    _rewrite(folder, name, content(folder))
    before = live_state(model, optimizer, scheduler, scaler)

    with pytest.raises(NoUsableCheckpointError, match="left as they were"):
        ckpt.restore(step=3)

    assert_unchanged(before, live_state(model, optimizer, scheduler, scaler))
    assert reason in events.details("corrupt")[0], events.details("corrupt")
    assert events.kinds("restore_failed") == [3] and events.kinds("restored") == []
    # and the run goes on from where it was
    assert len(train_steps(model, optimizer, scheduler, scaler, steps=1)) == 1


class _RefusesToLoad(torch.nn.Linear):
    """A module whose own load hook raises after every generic check passed (applied last, so the undo shows)."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("this module refuses its state")


def test_a_load_that_fails_while_applying_is_undone(tmp_path: Path) -> None:
    """The optimizer, scheduler, GradScaler and RNGs already applied are put back when the model's load raises."""
    torch.manual_seed(0); random.seed(0)
    model = torch.nn.Sequential(_RefusesToLoad(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    events = Events()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        on_event=events)
    train_steps(model, optimizer, scheduler, scaler, steps=3)
    ckpt.save(3)
    train_steps(model, optimizer, scheduler, scaler, steps=3)
    before = live_state(model, optimizer, scheduler, scaler)
    with pytest.raises(NoUsableCheckpointError):
        ckpt.restore(step=3)
    assert_unchanged(before, live_state(model, optimizer, scheduler, scaler))
    assert "could not be applied: RuntimeError: this module refuses its state" in events.details("corrupt")[0]


def test_fallback_restores_the_older_checkpoint_completely(tmp_path: Path) -> None:
    """A newest checkpoint that does not fit is skipped; the older one comes back in full."""
    torch.manual_seed(0); random.seed(0)
    model, optimizer, scheduler, scaler = setup()
    events = Events()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        good_window=1, keep=5, on_event=events)
    for step in range(1, 9):
        train_steps(model, optimizer, scheduler, scaler, steps=1)
        if step in (3, 6):
            ckpt.save(step)
            if step == 3:
                expected = live_state(model, optimizer, scheduler, scaler)
        ckpt.note_step(step, True)
    folder = tmp_path / "step-000000000006"
    _rewrite(folder, "optimizer.pt", _optimizer_with_wrong_moment_shape(folder))
    assert ckpt.restore() == 3
    restored = live_state(model, optimizer, scheduler, scaler)
    expected["opt_state_objects"] = restored["opt_state_objects"]  # new state objects, equal content
    assert_unchanged(expected, restored)
    assert events.kinds("corrupt") == [6] and events.kinds("restored") == [3]


def test_restore_arguments_are_checked_by_name(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer)
    for kwargs, field in (({"step": -1}, "step"), ({"step": "3"}, "step"), ({"before_step": 2.5}, "before_step")):
        with pytest.raises(ValueError, match=field):
            ckpt.restore(**kwargs)
