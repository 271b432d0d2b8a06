"""Issue 10 finding 10: a failed save raises CheckpointSaveError, leaves no litter, and is counted.

Today's code let a bare OSError (or torch's RuntimeError wrapping it, errno
lost) into the training loop, counted nothing, and a failed known-good marking
left a ``.tmp`` manifest behind. Failures here are real where the machine allows
(a file-size rlimit in a child process, a read-only or vanished directory) and
injected at the exact stage otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adamwatch.checkpoint as checkpoint_module
from adamwatch.checkpoint import CheckpointSaveError, Checkpointer

from ._checkpoints import Events, setup
from ._training import train_steps

ROOT = Path(__file__).resolve().parents[2]


def _litter(directory: Path) -> list[str]:
    """Temporary files and folders anywhere under the checkpoint directory."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.startswith((".tmp-", ".trash-")) or p.name.endswith(".tmp"))


def _checkpointer(directory: Path, **kwargs):
    model, optimizer, scheduler, scaler = setup()
    events = Events()
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        on_event=events, **kwargs)
    train_steps(model, optimizer, scheduler, scaler, steps=2)
    return ckpt, events


def _assert_failed_cleanly(ckpt: Checkpointer, events: Events, exc: CheckpointSaveError, *, step: int,
                           code: int | None, kept: list[int]) -> None:
    assert isinstance(exc, OSError) and exc.errno == code
    assert f"could not save the checkpoint of step {step} in {ckpt.directory}" in str(exc)
    assert "earlier checkpoints are intact" in str(exc)
    assert ckpt.save_failures == 1
    assert events.kinds("save_failed") == [step] and events.details("save_failed") == [str(exc)]
    assert _litter(ckpt.directory) == []
    assert [i.step for i in ckpt.checkpoints()] == kept
    for s in kept:  # what was there before still verifies and loads
        assert ckpt.restore(step=s) == s


def test_a_real_full_disk_in_a_child_process(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the optimizer file's write fail with EFBIG half-way through the save."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "instrumentation"))
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("_full_disk_saver.py")),
                             str(tmp_path), "150000"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["raised"] == "CheckpointSaveError" and outcome["is_oserror"]
    assert outcome["errno"] == errno.EFBIG and outcome["cause"] == "OSError"
    assert outcome["message"].startswith(f"could not save the checkpoint of step 2 in {tmp_path}: File too large (")
    assert "/optimizer.pt)" in outcome["message"]  # which file hit the limit
    assert outcome["save_failures"] == 1
    assert [e[0] for e in outcome["events"]] == ["saved", "save_failed"]
    assert _litter(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000001"]
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert Checkpointer(tmp_path, model=model, optimizer=optimizer).restore(step=1) == 1


@pytest.mark.parametrize("stage", ["data file", "manifest", "folder fsync"])
def test_enospc_at_each_stage_of_a_save(tmp_path: Path, monkeypatch, stage: str) -> None:
    ckpt, events = _checkpointer(tmp_path)
    ckpt.save(1)
    full = OSError(errno.ENOSPC, "No space left on device")

    if stage == "data file":
        calls = {"n": 0}
        real_write = checkpoint_module._HashingWriter.write

        def write(self, data):
            calls["n"] += 1
            if calls["n"] == 3:  # inside torch.save, which would wrap it into a RuntimeError
                self.error = full
                raise full
            return real_write(self, data)

        monkeypatch.setattr(checkpoint_module._HashingWriter, "write", write)
    elif stage == "manifest":
        def write_half(path, data):
            Path(path).write_bytes(data[: len(data) // 2])
            raise full

        monkeypatch.setattr(checkpoint_module, "_write_bytes_durably", write_half)
    else:
        def fsync_dir(path):
            raise full

        monkeypatch.setattr(checkpoint_module, "_fsync_dir", fsync_dir)

    with pytest.raises(CheckpointSaveError) as caught:
        ckpt.save(2)
    monkeypatch.undo()
    assert "No space left on device" in str(caught.value)
    _assert_failed_cleanly(ckpt, events, caught.value, step=2, code=errno.ENOSPC, kept=[1])


def test_replacing_a_step_that_fails_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    """Saving step 1 again: the old folder is set aside, and put back when the new one cannot take its place."""
    ckpt, events = _checkpointer(tmp_path)
    ckpt.save(1)
    old_manifest = (tmp_path / "step-000000000001" / "manifest.json").read_bytes()
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointSaveError) as caught:
        ckpt.save(1)
    monkeypatch.undo()
    assert (tmp_path / "step-000000000001" / "manifest.json").read_bytes() == old_manifest
    _assert_failed_cleanly(ckpt, events, caught.value, step=1, code=errno.EIO, kept=[1])


def _make_read_only(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    # root ignores permissions; an immutable directory refuses new entries even to root
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a directory read-only for root here (no chattr +i)")


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


def test_a_read_only_directory(tmp_path: Path) -> None:
    ckpt, events = _checkpointer(tmp_path / "ckpt")
    ckpt.save(1)
    _make_read_only(ckpt.directory)
    try:
        with pytest.raises(CheckpointSaveError) as caught:
            ckpt.save(2)
    finally:
        _make_writable(ckpt.directory)
    assert caught.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    _assert_failed_cleanly(ckpt, events, caught.value, step=2, code=caught.value.errno, kept=[1])


def test_a_vanished_directory_is_not_recreated(tmp_path: Path) -> None:
    """A disk that went away: the save fails with ENOENT instead of writing to whatever is mounted below."""
    ckpt, events = _checkpointer(tmp_path / "mnt" / "ckpt")
    shutil.rmtree(tmp_path / "mnt")
    with pytest.raises(CheckpointSaveError) as caught:
        ckpt.save(1)
    assert caught.value.errno == errno.ENOENT
    assert not (tmp_path / "mnt").exists()
    assert ckpt.save_failures == 1 and events.kinds("save_failed") == [1]


def test_a_state_that_cannot_be_serialised_is_the_same_error(tmp_path: Path) -> None:
    ckpt, events = _checkpointer(tmp_path)
    ckpt.save(1)
    ckpt.scheduler.not_picklable = lambda: None  # lands in scheduler.state_dict(); pickle refuses a lambda
    with pytest.raises(CheckpointSaveError) as caught:
        ckpt.save(2)
    assert caught.value.errno is None and caught.value.__cause__ is not None
    _assert_failed_cleanly(ckpt, events, caught.value, step=2, code=None, kept=[1])


def test_a_failed_known_good_marking_leaves_no_tmp_file_and_is_retried(tmp_path: Path, monkeypatch) -> None:
    ckpt, events = _checkpointer(tmp_path, good_window=1)
    ckpt.save(1)
    real = checkpoint_module._write_bytes_durably
    attempts = []

    def write_half(path, data):
        attempts.append(Path(path).name)
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write_bytes_durably", write_half)
    for step in range(1, 30):
        ckpt.note_step(step, True)  # step 2 proves checkpoint 1 good: the marking fails
    monkeypatch.setattr(checkpoint_module, "_write_bytes_durably", real)
    assert len(attempts) == 1  # not retried on every step
    assert _litter(tmp_path) == []
    manifest = json.loads((tmp_path / "step-000000000001" / "manifest.json").read_text())
    assert manifest["known_good"] is False and events.kinds("known_good") == []
    ckpt.save(30)  # the next save retries
    assert events.kinds("known_good") == [1]
    assert json.loads((tmp_path / "step-000000000001" / "manifest.json").read_text())["known_good"] is True
