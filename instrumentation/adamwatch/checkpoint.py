"""Crash-safe checkpoints that know whether the run was healthy around them.

    ckpt = adamwatch.Checkpointer("ckpt/rank0", model=model, optimizer=optimizer,
                                  scheduler=scheduler, keep=3, good_window=20)
    monitor = adamwatch.watch(optimizer, scheduler=scheduler, checkpointer=ckpt)
    for step, batch in enumerate(loader, start=1):
        ...
        optimizer.step(); scheduler.step()
        if step % 50 == 0:
            ckpt.save(step)

On disk, one folder per checkpoint::

    DIR/step-000000000150/model.pt        model.state_dict()
                          optimizer.pt    optimizer.state_dict() (m, v, step, param groups)
                          trainer.pt      scheduler, GradScaler, RNG states (torch, CUDA, random, numpy)
                          manifest.json   step, time, sha256 + size per file, known_good

A checkpoint is written into ``DIR/.tmp-...``; every file is fsynced, the
manifest is written last, the folder is renamed into place and ``DIR`` is
fsynced. A folder without a valid manifest is never used, so a process killed
at any moment leaves every earlier checkpoint intact. Marking a checkpoint
known-good rewrites its manifest the same way (temporary file, fsync, rename).

A checkpoint at step ``s`` becomes known-good once the steps ``s+1 ..
s+good_window`` have been reported by :meth:`Checkpointer.note_step` and no
step in ``[s-good_window, s+good_window]`` was unhealthy (a step reported
unhealthy, or one named by :meth:`Checkpointer.note_incident`). An incident
reported late revokes the flag of the checkpoints whose window it falls into.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointInfo", "Checkpointer", "NoUsableCheckpointError"]

log = logging.getLogger(__name__)

_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_MANIFEST = "manifest.json"
_FORMAT = 1

#: on_event(kind, step, path, detail); kind in "saved", "known_good", "restored", "corrupt"
EventCallback = Callable[[str, int, "str | None", "str | None"], None]


class NoUsableCheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint on disk (its manifest was read)."""

    step: int
    path: Path
    time: float
    known_good: bool
    files: dict[str, dict[str, Any]]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_name(step: int) -> str:
    return f"{_PREFIX}{step:012d}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # tuples -> lists so that weights_only loading accepts them
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy  # optional: only when the user has it
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]
    return state


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy
        except ImportError:
            log.warning("adamwatch: checkpoint holds a numpy RNG state but numpy is not importable")
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            numpy.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


class Checkpointer:
    """Atomic, checksummed checkpoints with a known-good flag.

    Args:
        directory: where checkpoints live (created if missing). Give every rank
            its own directory (``f"ckpt/rank{rank}"``): RNG states differ per rank.
        model: the ``torch.nn.Module`` (a DDP wrapper is fine).
        optimizer: the optimizer (m, v and step are saved exactly).
        scheduler: LR scheduler or None.
        scaler: ``torch.amp.GradScaler`` or None.
        keep: how many checkpoints to keep (>= 1); the newest known-good one is
            never deleted. Choose ``keep * save_interval > good_window`` or
            checkpoints are pruned before they can be proven good.
        good_window: healthy steps needed on each side of a checkpoint.
        on_event: ``(kind, step, path, detail)`` for "saved", "known_good",
            "restored", "corrupt"; exceptions it raises are logged and ignored.
        on_restore: ``(step) -> None`` after a restore, to reposition the data
            loader and skip the batches around the incident.
        weights_only: load with ``torch.load(weights_only=True)`` (default). Set
            False only for schedulers whose state holds arbitrary objects.
        clock: returns the wall time written to the manifest (injectable).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        scaler: Any = None,
        keep: int = 3,
        good_window: int = 20,
        on_event: EventCallback | None = None,
        on_restore: Callable[[int], None] | None = None,
        weights_only: bool = True,
        clock: Callable[[], float] = time.time,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep: must be an int >= 1, got {keep!r}")
        if isinstance(good_window, bool) or not isinstance(good_window, int) or good_window < 0:
            raise ValueError(f"good_window: must be an int >= 0, got {good_window!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.keep = keep
        self.good_window = good_window
        self.on_event = on_event
        self.on_restore = on_restore
        self.weights_only = weights_only
        self._clock = clock
        # guards the health history and every manifest write: note_step runs on
        # the Monitor's background thread while save/restore run on the trainer's
        self._lock = threading.RLock()
        self._unhealthy: set[int] = set()
        self._last_noted: int | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        # step -> info of what is on disk; note_step consults this, not the disk
        self._index: dict[int, CheckpointInfo] = {}
        self._refresh_index()

    def _refresh_index(self) -> None:
        self._index = {info.step: info for info in self.checkpoints()}

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[CheckpointInfo]:
        """Complete checkpoints on disk, oldest first (unreadable manifests skipped).

        Returns:
            One :class:`CheckpointInfo` per folder with a readable manifest.
        """
        found = []
        for entry in self.directory.iterdir():
            if not entry.name.startswith(_PREFIX) or not entry.is_dir():
                continue
            manifest = self._read_manifest(entry)
            if manifest is not None:
                found.append(manifest)
        return sorted(found, key=lambda info: info.step)

    def _read_manifest(self, folder: Path) -> CheckpointInfo | None:
        try:
            data = json.loads((folder / _MANIFEST).read_text())
            return CheckpointInfo(
                step=int(data["step"]),
                path=folder,
                time=float(data["time"]),
                known_good=bool(data["known_good"]),
                files=dict(data["files"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("adamwatch: ignoring checkpoint folder %s: unreadable manifest (%s)", folder, exc)
            return None

    def _remove_leftovers(self) -> None:
        """Delete temporary folders of saves that died (never a live writer's)."""
        for entry in self.directory.iterdir():
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                pid_text = entry.name.split("-")[1] if entry.name.count("-") >= 2 else ""
                if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                    continue
                shutil.rmtree(entry, ignore_errors=True)

    # --------------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """Write a checkpoint of everything needed to continue at ``step``.

        Args:
            step: the optimizer step just completed (the numbering the Monitor
                reports to :meth:`note_step`).

        Returns:
            The checkpoint's folder.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be an int >= 0, got {step!r}")
        payloads = {
            "model.pt": self._unwrapped_model().state_dict(),
            "optimizer.pt": self.optimizer.state_dict(),
            "trainer.pt": {
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": _capture_rng(),
            },
        }
        tmp = self.directory / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            files = {}
            for name, obj in payloads.items():
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                data = buffer.getvalue()
                _write_file_durably(tmp / name, data)
                files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            with self._lock:
                manifest = {
                    "format": _FORMAT,
                    "step": step,
                    "time": self._clock(),
                    "known_good": False,
                    "files": files,
                }
                _write_file_durably(tmp / _MANIFEST, json.dumps(manifest, indent=1).encode())
                _fsync_dir(tmp)
                final = self.directory / _folder_name(step)
                if final.exists():  # the same step saved again (e.g. after a restore)
                    trash = self.directory / f"{_TRASH_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
                    final.rename(trash)
                    tmp.rename(final)
                    _fsync_dir(self.directory)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    tmp.rename(final)
                    _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._emit("saved", step, final, None)
        with self._lock:
            self._refresh_index()
            self._update_known_good()
            self._prune()
        return final

    def _unwrapped_model(self) -> torch.nn.Module:
        # DDP/FSDP-1 wrappers keep the user's model in .module; saving that keeps
        # the keys free of the "module." prefix, so either form can load it.
        return getattr(self.model, "module", self.model)

    def _prune(self) -> None:
        infos = sorted(self._index.values(), key=lambda i: i.step)
        if len(infos) <= self.keep:
            return
        good = [i for i in infos if i.known_good]
        protected = {good[-1].step} if good else set()
        keep_steps = {i.step for i in infos[-self.keep :]} | protected
        for info in infos:
            if info.step in keep_steps:
                continue
            if not info.known_good and self._verdict(info.step) is None:
                log.warning(
                    "adamwatch: pruning checkpoint step %d before it could be proven good "
                    "(keep=%d is too small for good_window=%d at this save interval)",
                    info.step,
                    self.keep,
                    self.good_window,
                )
            self._delete(info.path)
            self._index.pop(info.step, None)

    def _delete(self, folder: Path) -> None:
        # rename first: a half-deleted folder must not look like a checkpoint
        trash = self.directory / f"{_TRASH_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            folder.rename(trash)
        except OSError:
            return
        _fsync_dir(self.directory)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ health
    def note_step(self, step: int, healthy: bool) -> None:
        """Record one step's health (thread-safe; called for every step summary).

        Args:
            step: the step number.
            healthy: False when the step was non-finite, skipped or flagged.
        """
        with self._lock:
            if not healthy:
                self._unhealthy.add(step)
            if self._last_noted is None or step > self._last_noted:
                self._last_noted = step
            if not healthy:
                self._revoke_around(step)
            self._update_known_good()

    def note_incident(self, step: int) -> None:
        """Mark ``step`` unhealthy (e.g. a loss spike seen by the sidecar), even late.

        Args:
            step: the step of the incident.
        """
        with self._lock:
            self._unhealthy.add(step)
            self._revoke_around(step)

    def _verdict(self, ckpt_step: int) -> bool | None:
        """True good, False bad, None not yet known."""
        lo, hi = ckpt_step - self.good_window, ckpt_step + self.good_window
        if any(lo <= s <= hi for s in self._unhealthy):
            return False
        if self._last_noted is None or self._last_noted < hi:
            return None
        return True

    def _update_known_good(self) -> None:
        for info in list(self._index.values()):
            if not info.known_good and self._verdict(info.step):
                if self._set_known_good(info, True):
                    self._emit("known_good", info.step, info.path, None)
        self._forget_old_history()

    def _revoke_around(self, step: int) -> None:
        for info in list(self._index.values()):
            if info.known_good and abs(info.step - step) <= self.good_window:
                log.warning(
                    "adamwatch: checkpoint step %d is no longer known-good: incident at step %d",
                    info.step,
                    step,
                )
                self._set_known_good(info, False)

    def _forget_old_history(self) -> None:
        oldest = min(self._index) if self._index else self._last_noted
        if oldest is not None:
            self._unhealthy = {s for s in self._unhealthy if s >= oldest - self.good_window}

    def _set_known_good(self, info: CheckpointInfo, value: bool) -> bool:
        manifest_path = info.path / _MANIFEST
        try:
            data = json.loads(manifest_path.read_text())
            data["known_good"] = value
            tmp = info.path / f"{_MANIFEST}.{uuid.uuid4().hex}.tmp"
            _write_file_durably(tmp, json.dumps(data, indent=1).encode())
            os.replace(tmp, manifest_path)
            _fsync_dir(info.path)
        except (OSError, ValueError) as exc:
            log.warning("adamwatch: could not update manifest of %s: %s", info.path, exc)
            self._index.pop(info.step, None)
            return False
        self._index[info.step] = dataclasses.replace(info, known_good=value)
        return True

    # ----------------------------------------------------------------- restore
    def select(self, step: int | None = None, *, before_step: int | None = None) -> int:
        """The step :meth:`restore` would restore now (verifying checksums).

        Rank 0 calls this to pin ``step=None`` to a concrete step before
        broadcasting a restore to the other ranks.

        Args:
            step: an exact step, or None for the newest usable known-good one.
            before_step: with ``step=None``, only checkpoints strictly before it.

        Returns:
            The step.
        """
        with self._lock:
            for info in self._candidates(step, before_step):
                problem = self._verify(info)
                if problem is None:
                    return info.step
                log.warning("adamwatch: checkpoint %s unusable: %s", info.path, problem)
        raise NoUsableCheckpointError(self._nothing_usable_message(step, before_step))

    def _candidates(self, step: int | None, before_step: int | None) -> list[CheckpointInfo]:
        self._refresh_index()  # the disk is the truth: another process may have pruned
        infos = sorted(self._index.values(), key=lambda i: i.step)
        if step is not None:
            return [i for i in infos if i.step == step]
        infos = [i for i in infos if i.known_good and (before_step is None or i.step < before_step)]
        return list(reversed(infos))

    def _nothing_usable_message(self, step: int | None, before_step: int | None) -> str:
        if step is not None:
            what = f"checkpoint for step {step}"
        elif before_step is not None:
            what = f"known-good checkpoint before step {before_step}"
        else:
            what = "known-good checkpoint"
        return f"no usable {what} in {self.directory}"

    def _verify(self, info: CheckpointInfo) -> str | None:
        for name, meta in info.files.items():
            path = info.path / name
            if not path.is_file():
                return f"{name} is missing"
            actual = _sha256_file(path)
            if actual != meta.get("sha256"):
                return f"{name} sha256 mismatch (expected {meta.get('sha256')}, got {actual})"
        if set(info.files) != {"model.pt", "optimizer.pt", "trainer.pt"}:
            return f"manifest lists {sorted(info.files)}, expected model.pt, optimizer.pt, trainer.pt"
        return None

    def restore(self, step: int | None = None, *, before_step: int | None = None) -> int:
        """Restore model, optimizer, scheduler, scaler and RNG from a checkpoint.

        With ``step=None`` the newest known-good checkpoint (strictly before
        ``before_step`` if given) is used; a corrupt, missing or unloadable one
        is reported ("corrupt" event, log) and the next older known-good one is
        tried. An explicit ``step`` is restored whether known-good or not, with
        no fallback. Checkpoints newer than the restored one belong to the
        abandoned trajectory and are deleted, and the health history after the
        restored step is forgotten. Then ``on_restore(step)`` is called.

        Args:
            step: an exact step to restore, or None.
            before_step: only with ``step=None``: the incident's step.

        Returns:
            The restored step.

        Raises:
            NoUsableCheckpointError: nothing usable; the message names the directory.
        """
        if step is not None and before_step is not None:
            raise ValueError("before_step: only allowed when step is None")
        with self._lock:
            restored = None
            for info in self._candidates(step, before_step):
                problem = self._verify(info)
                if problem is None:
                    try:
                        self._load(info)
                    except Exception as exc:  # noqa: BLE001 - any load failure means "try older"
                        problem = f"could not be loaded: {type(exc).__name__}: {exc}"
                if problem is None:
                    restored = info
                    break
                log.warning("adamwatch: checkpoint %s unusable, trying an older one: %s", info.path, problem)
                self._emit("corrupt", info.step, info.path, problem)
            if restored is None:
                raise NoUsableCheckpointError(self._nothing_usable_message(step, before_step))
            for info in self.checkpoints():
                if info.step > restored.step:
                    self._delete(info.path)
            self._refresh_index()
            self._unhealthy = {s for s in self._unhealthy if s <= restored.step}
            self._last_noted = restored.step
        self._emit("restored", restored.step, restored.path, None)
        if self.on_restore is not None:
            self.on_restore(restored.step)
        return restored.step

    def _load(self, info: CheckpointInfo) -> None:
        def load(name: str) -> Any:
            return torch.load(info.path / name, map_location="cpu", weights_only=self.weights_only)

        # load all three before touching anything: a bad file leaves the run as it was
        model_state, optimizer_state, trainer_state = load("model.pt"), load("optimizer.pt"), load("trainer.pt")
        self._unwrapped_model().load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)
        if self.scheduler is not None and trainer_state["scheduler"] is not None:
            self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.scaler is not None and trainer_state["scaler"] is not None:
            self.scaler.load_state_dict(trainer_state["scaler"])
        _restore_rng(trainer_state["rng"])

    # ------------------------------------------------------------------ events
    def _emit(self, kind: str, step: int, path: Path | None, detail: str | None) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, step, str(path) if path is not None else None, detail)
        except Exception:  # noqa: BLE001 - a callback must never break a save
            log.exception("adamwatch: checkpoint on_event callback failed")
