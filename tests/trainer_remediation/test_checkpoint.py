"""Checkpointer: exact round trip, checksums and fallback, pruning, known-good logic."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from adamwatch.checkpoint import Checkpointer, NoUsableCheckpointError

from ._checkpoints import Events, good_checkpoints, setup
from ._training import OPTIMIZER_CONFIGS, assert_same, config_id, make_model, snapshot, train_steps


@pytest.mark.parametrize("config", OPTIMIZER_CONFIGS, ids=config_id)
def test_round_trip_continues_bit_exactly(tmp_path: Path, config) -> None:
    torch.manual_seed(1); random.seed(1)
    model, optimizer, scheduler, scaler = setup(config)
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    train_steps(model, optimizer, scheduler, scaler, steps=5)
    ckpt.save(5)
    original_losses = train_steps(model, optimizer, scheduler, scaler, steps=5)
    original = snapshot(model, optimizer, scheduler, scaler)

    # a fresh process' worth of objects, differently initialised, empty optimizer state
    torch.manual_seed(99); random.seed(99)
    model2, optimizer2, scheduler2, scaler2 = setup(config, seed=7)
    restored_at = []
    ckpt2 = Checkpointer(
        tmp_path, model=model2, optimizer=optimizer2, scheduler=scheduler2, scaler=scaler2,
        on_restore=restored_at.append,
    )
    assert ckpt2.restore(step=5) == 5
    assert restored_at == [5]
    resumed_losses = train_steps(model2, optimizer2, scheduler2, scaler2, steps=5)
    assert resumed_losses == original_losses
    assert_same(snapshot(model2, optimizer2, scheduler2, scaler2), original)


def test_manifest_lists_sha256_of_every_file(tmp_path: Path) -> None:
    model, optimizer, scheduler, scaler = setup()
    folder = Checkpointer(tmp_path, model=model, optimizer=optimizer).save(3)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["known_good"] is False
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "trainer.pt"}
    import hashlib
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    ("flip", "sha256 mismatch"),
    ("delete", "model.pt is missing"),
    ("truncate", "trainer.pt has"),
    ("truncate-manifest", "invalid manifest.json"),
])
def test_corrupt_newest_falls_back_to_older(tmp_path: Path, damage: str, reason: str) -> None:
    events = Events()
    ckpt, model, optimizer, _ = good_checkpoints(tmp_path, {4, 8, 12}, events)
    assert [i.step for i in ckpt.checkpoints() if i.known_good] == [4, 8, 12]
    newest = tmp_path / "step-000000000012"
    if damage == "flip":
        _flip_a_byte(newest / "optimizer.pt")
    elif damage == "delete":
        (newest / "model.pt").unlink()
    elif damage == "truncate":
        (newest / "trainer.pt").write_bytes((newest / "trainer.pt").read_bytes()[:-10])
    else:
        (newest / "manifest.json").write_text("{")
    assert ckpt.restore() == 8
    (kind, step, path, detail), = [e for e in events.seen if e[0] == "corrupt"]
    assert step == 12 and path == str(newest) and reason in detail
    assert ckpt.corrupt_checkpoints == 1
    assert events.kinds("restored") == [8]


def test_unloadable_file_with_matching_checksum_falls_back(tmp_path: Path) -> None:
    events = Events()
    ckpt, *_ = good_checkpoints(tmp_path, {4, 8}, events)
    folder = tmp_path / "step-000000000008"
    (folder / "trainer.pt").write_bytes(b"not a torch file")
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib
    manifest["files"]["trainer.pt"] = {"sha256": hashlib.sha256(b"not a torch file").hexdigest(),
                                       "bytes": len(b"not a torch file")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.restore() == 4
    assert "could not be loaded" in [e for e in events.seen if e[0] == "corrupt"][0][3]


def test_nothing_usable_names_the_directory(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer)
    with pytest.raises(NoUsableCheckpointError, match=str(tmp_path)):
        ckpt.restore()
    ckpt.save(1)  # saved, but never proven good
    with pytest.raises(NoUsableCheckpointError, match="known-good"):
        ckpt.restore()
    with pytest.raises(NoUsableCheckpointError, match="step 7"):
        ckpt.restore(step=7)
    assert ckpt.restore(step=1) == 1  # an explicit step needs no known-good flag


def test_known_good_needs_a_healthy_window_on_both_sides(tmp_path: Path) -> None:
    events = Events()
    model, optimizer, _, _ = setup()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, good_window=3, on_event=events, keep=10)
    ckpt.save(10)
    ckpt.save(20)
    for step in range(5, 13):
        ckpt.note_step(step, True)
    assert events.kinds("known_good") == []  # step 13 not seen yet
    ckpt.note_step(13, True)
    assert events.kinds("known_good") == [10]
    assert json.loads((tmp_path / "step-000000000010" / "manifest.json").read_text())["known_good"] is True
    # an unhealthy step within 3 before step 20 disqualifies it for good
    ckpt.note_step(17, False)
    for step in range(18, 30):
        ckpt.note_step(step, True)
    assert events.kinds("known_good") == [10]
    assert [i.known_good for i in ckpt.checkpoints()] == [True, False]


def test_late_incident_revokes_and_before_step_picks_older(tmp_path: Path) -> None:
    ckpt, *_ = good_checkpoints(tmp_path, {4, 8, 12})
    assert ckpt.restore(before_step=12) == 8
    ckpt, *_ = good_checkpoints(tmp_path / "b", {4, 8, 12})
    ckpt.note_incident(13)  # the sidecar saw a spike at 13, after 12 was marked good
    assert [i.step for i in ckpt.checkpoints() if i.known_good] == [4, 8]
    assert ckpt.restore() == 8


def test_restore_drops_the_abandoned_future(tmp_path: Path) -> None:
    ckpt, model, optimizer, _ = good_checkpoints(tmp_path, {4, 8, 12})
    assert ckpt.restore(step=4) == 4
    assert [i.step for i in ckpt.checkpoints()] == [4]
    # the steps after 4 are re-run: their old health no longer counts
    ckpt.note_step(5, True); ckpt.note_step(6, True)
    ckpt.save(6)
    assert ckpt.checkpoints()[-1].step == 6


def test_keep_prunes_but_never_the_newest_known_good(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, keep=2, good_window=1)
    ckpt.save(1)
    ckpt.note_step(1, True); ckpt.note_step(2, True)  # 1 is good
    ckpt.note_step(4, False)  # everything later is disqualified
    for step in (3, 4, 5, 6):
        ckpt.save(step)
    assert [i.step for i in ckpt.checkpoints()] == [1, 5, 6]
    assert ckpt.restore() == 1
    ckpt2 = Checkpointer(tmp_path / "plain", model=model, optimizer=optimizer, keep=3)
    for step in range(1, 8):
        ckpt2.save(step)
    assert [i.step for i in ckpt2.checkpoints()] == [5, 6, 7]


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer)
    ckpt.save(3)
    train_steps(model, optimizer, steps=1)
    expected = [p.detach().clone() for p in model.parameters()]
    ckpt.save(3)
    train_steps(model, optimizer, steps=2)
    ckpt.restore(step=3)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000003"]


def test_note_step_from_another_thread_while_saving(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, keep=3, good_window=2)
    stop = threading.Event()
    errors = []

    def reporter() -> None:
        try:
            step = 0
            while not stop.is_set():
                step += 1
                ckpt.note_step(step, True)
        except Exception as exc:  # pragma: no cover - the failure is asserted below
            errors.append(exc)

    thread = threading.Thread(target=reporter)
    thread.start()
    try:
        for step in range(1, 15):
            ckpt.save(step)
    finally:
        stop.set(); thread.join(10)
    assert errors == []
    assert len(ckpt.checkpoints()) >= 3
    ckpt.restore()


def test_bad_arguments_are_rejected_by_name(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, model=model, optimizer=optimizer, keep=0)
    with pytest.raises(ValueError, match="good_window"):
        Checkpointer(tmp_path, model=model, optimizer=optimizer, good_window=-1)
    with pytest.raises(TypeError, match="optimizer"):
        Checkpointer(tmp_path, model=model, optimizer=object())
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match="step"):
        ckpt.save(-1)
    with pytest.raises(ValueError, match="before_step"):
        ckpt.restore(step=1, before_step=3)


def test_event_callback_failure_does_not_break_save(tmp_path: Path) -> None:
    model, optimizer, _, _ = setup()

    def boom(*args):
        raise RuntimeError("callback broke")

    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, on_event=boom)
    assert ckpt.save(1).is_dir()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kwargs", [{"fused": True}, {"foreach": True}, {"capturable": True}])
def test_round_trip_on_cuda_with_cuda_rng(tmp_path: Path, kwargs) -> None:
    device = torch.device("cuda")

    def steps(model, optimizer, n):
        losses = []
        for _ in range(n):
            x = torch.randn(4, 8, device=device)  # consumes the CUDA generator
            loss = model(x).square().mean()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            losses.append(loss.item())
        return losses

    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **kwargs)
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer)
    steps(model, optimizer, 3)
    ckpt.save(3)
    expected = steps(model, optimizer, 3)
    expected_params = [p.detach().clone() for p in model.parameters()]
    torch.cuda.manual_seed(123)
    model2 = make_model(seed=5).to(device)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, **kwargs)
    Checkpointer(tmp_path, model=model2, optimizer=optimizer2).restore(step=3)
    assert steps(model2, optimizer2, 3) == expected
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), expected_params))
