"""Crash-safe checkpoints that know whether the run was healthy around them.

    ckpt = adamwatch.Checkpointer("ckpt/rank0", model=model, optimizer=optimizer,
                                  scheduler=scheduler, keep=3, good_window=20)
    monitor = adamwatch.watch(optimizer, scheduler=scheduler, checkpointer=ckpt)
    for step, batch in enumerate(loader, start=1):
        ...
        optimizer.step(); scheduler.step()
        if step % 50 == 0:
            try:
                ckpt.save(step)
            except adamwatch.checkpoint.CheckpointSaveError as exc:
                log.error("no checkpoint this time: %s", exc)   # counted and reported already

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

Manifests are read strictly (:mod:`adamwatch.checkpoint_manifest`); a folder
that breaks a rule, a file whose size or sha256 differs from its manifest, a
file torch cannot load, or state that does not fit the live model and
optimizer (:mod:`adamwatch.checkpoint_state`) makes the checkpoint *unusable*:
it is skipped, counted in :attr:`Checkpointer.corrupt_checkpoints`, logged and
reported once as a ``corrupt`` event, and a restore tries the next older one.

A checkpoint at step ``s`` becomes known-good once the steps ``s+1 ..
s+good_window`` have been reported by :meth:`Checkpointer.note_step` and no
step in ``[s-good_window, s+good_window]`` was unhealthy (a step reported
unhealthy, or one named by :meth:`Checkpointer.note_incident`). An incident
reported late revokes the flag of the checkpoints whose window it falls into.

Events (:data:`adamwatch.wire.CHECKPOINT_EVENTS`) go to ``on_event(kind, step,
path, detail)`` and, with durations and sizes, to every listener added with
:meth:`Checkpointer.add_listener` (the Monitor adds one and forwards them to the
sidecar, which exports checkpoint health from them).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .checkpoint_manifest import (
    DATA_FILES,
    FOLDER_PREFIX,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    CheckpointInfo,
    InvalidManifestError,
    encode_manifest,
    folder_name,
    parse_manifest,
    step_of_folder,
)
from .checkpoint_config import ON_MISMATCH, config_differences, saved_config_entries
from .checkpoint_state import apply_loaded_state, capture_rng, check_loaded_state
from .lr_control import current_lr_scales

__all__ = [
    "CheckpointConfigMismatchError",
    "CheckpointEvent",
    "CheckpointInfo",
    "CheckpointSaveError",
    "Checkpointer",
    "NoUsableCheckpointError",
]

log = logging.getLogger(__name__)

# The default process group, named without holding a reference to it.
_DEFAULT_GROUP = "default"

# Temporary names start with these, then "<pid>-<hex>": a save's folder, a
# replaced or pruned folder on its way out, a known-good manifest being rewritten.
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# Events kept while no listener is registered (a restore at start-up, corrupt
# folders found by the constructor), delivered to the next listener added.
_BACKLOG = 32

#: on_event(kind, step, path, detail); kind in adamwatch.wire.CHECKPOINT_EVENTS
EventCallback = Callable[[str, int, "str | None", "str | None"], None]


class NoUsableCheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored; the live state was left unchanged."""


class CheckpointConfigMismatchError(NoUsableCheckpointError):
    """No checkpoint was restored, and at least one was refused because it was saved with
    another optimizer configuration (``on_mismatch="refuse"``).

    Attributes:
        differences: checkpoint step -> the differing fields, ``"path: checkpoint -> live"``.
    """

    def __init__(self, message: str, differences: dict[int, list[str]]):
        super().__init__(message)
        self.differences = differences


class CheckpointSaveError(OSError):
    """:meth:`Checkpointer.save` failed; nothing of the new checkpoint is left and earlier ones are intact.

    An ``OSError``, so ``except OSError`` in a training loop keeps working.
    ``errno``/``strerror`` are the underlying OS error's (ENOSPC, EACCES, EFBIG,
    EIO, ENOENT for a vanished directory, ...) or None when the failure was not
    an OS error (a state that cannot be serialised); the original exception is
    ``__cause__``. Every failure is counted in ``Checkpointer.save_failures``
    and reported as a ``save_failed`` event.

    Args:
        step: the step that was being saved.
        directory: the checkpoint directory.
        cause: the exception that stopped the save.
    """

    def __init__(self, step: int, directory: Path, cause: BaseException):
        code = cause.errno if isinstance(cause, OSError) else None
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(cause).__name__}: {cause}"
        where = f" ({cause.filename})" if isinstance(cause, OSError) and cause.filename else ""
        message = (f"could not save the checkpoint of step {step} in {directory}: {why}{where}; "
                   f"nothing of it was kept and earlier checkpoints are intact")
        if code is None:
            super().__init__(message)
        else:
            super().__init__(code, message)
        self.step = step
        self.directory = directory

    def __str__(self) -> str:
        return self.strerror if self.errno is not None else super().__str__()


@dataclass(frozen=True)
class CheckpointEvent:
    """Something that happened to a checkpoint (what listeners and the sidecar receive).

    Args:
        kind: one of :data:`adamwatch.wire.CHECKPOINT_EVENTS`.
        step: the checkpoint's step (``restore_failed``: the step asked for, or
            the newest step reported to :meth:`Checkpointer.note_step`, or 0).
        time: unix seconds (the Checkpointer's clock).
        path: the checkpoint's folder, when there is one.
        detail: why (corrupt, save_failed, restore_failed).
        duration_s: how long the save or restore took.
        size_bytes: bytes of the checkpoint's data files (saved, restored).
    """

    kind: str
    step: int
    time: float
    path: str | None = None
    detail: str | None = None
    duration_s: float | None = None
    size_bytes: int | None = None
    lr_scale: float | None = None  # restored: adamwatch's learning-rate scale now in force

    def as_payload(self) -> dict[str, Any]:
        """The CHECKPOINT message payload (adamwatch.wire.SCHEMAS)."""
        payload: dict[str, Any] = {"event": self.kind, "step": self.step, "time": self.time,
                                   "path": self.path, "detail": self.detail}
        if self.duration_s is not None:
            payload["duration_s"] = self.duration_s
        if self.size_bytes is not None:
            payload["size_bytes"] = self.size_bytes
        if self.lr_scale is not None:
            payload["lr_scale"] = self.lr_scale
        return payload


class _Unusable(Exception):
    """A checkpoint that cannot be restored; the message says why."""


# --------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _HashingWriter:
    """A write-only file for ``torch.save`` that hashes and counts what passes through.

    It also keeps the OSError of a failed write: torch wraps it into a
    RuntimeError that loses the errno.
    """

    def __init__(self, file: BinaryIO):
        self._file = file
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            written = self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self._file.flush()


def _save_durably(path: Path, obj: Any) -> dict[str, Any]:
    """torch.save ``obj`` straight to ``path`` (no in-memory copy), fsync; return its manifest entry.

    Raises:
        OSError: with ``filename`` set, whatever stage failed.
    """
    try:
        with open(path, "xb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(obj, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return {"sha256": writer.digest.hexdigest(), "bytes": writer.size}


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; a symlink, FIFO or device is refused, never followed or waited on."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Unusable(f"{path.name} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_manifest(folder: Path) -> CheckpointInfo:
    try:
        with _open_regular(folder / MANIFEST) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise _Unusable(f"{MANIFEST} is missing") from None
    except OSError as exc:
        raise _Unusable(f"{MANIFEST} cannot be read: {exc}") from None
    try:
        return parse_manifest(folder, raw)
    except InvalidManifestError as exc:
        raise _Unusable(f"invalid {MANIFEST}: {exc}") from None


def _remove(path: Path) -> None:
    """Delete a file or folder, whatever is left of it (errors ignored: leftovers are swept at start-up)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(name: str) -> bool:
    """A temporary name whose writer is gone (or this process, which writes nothing at start-up)."""
    pid_text = name.split("-")[1] if name.count("-") >= 2 else ""
    return not (pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)))


def _temp_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex}{suffix}"


class Checkpointer:
    """Atomic, checksummed, strictly validated checkpoints with a known-good flag.

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
        on_event: ``(kind, step, path, detail)`` for every event
            (:data:`adamwatch.wire.CHECKPOINT_EVENTS`); exceptions it raises are
            logged and ignored. :meth:`add_listener` gives the whole event.
        on_restore: ``(step) -> None`` after a restore, to reposition the data
            loader and skip the batches around the incident.
        weights_only: load with ``torch.load(weights_only=True)`` (default). Set
            False only for schedulers whose state holds arbitrary objects.
        clock: returns the wall time written to manifests and events (injectable).
        timer: a monotonic clock for save and restore durations (injectable).
        on_mismatch: "refuse" (default): a checkpoint saved with another
            optimizer configuration (:mod:`adamwatch.checkpoint_config`) is not
            restored, and the error lists the differing fields; "warn": it is
            restored, the differences are logged, and the checkpoint's
            hyperparameters are in force afterwards (``load_state_dict`` puts
            its param groups back).
        agree_across_ranks: under torch.distributed, make every rank restore
            the same step: the newest one usable on every rank, chosen with a
            blocking all-gather over gloo at restore time (off the step path).
            If none is usable everywhere, every rank refuses. "auto" (default):
            when a process group with more than one rank is initialised.
            Every rank must then call restore() with the same arguments.

    Attributes:
        save_failures: saves that raised :class:`CheckpointSaveError`.
        corrupt_checkpoints: checkpoints found unusable and skipped (each counted once).
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
        timer: Callable[[], float] = time.perf_counter,
        on_mismatch: str = "refuse",
        agree_across_ranks: bool | str = "auto",
    ):
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch: must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
        if agree_across_ranks not in (True, False, "auto"):
            raise ValueError(f"agree_across_ranks: must be True, False or 'auto', got {agree_across_ranks!r}")
        self.on_mismatch = on_mismatch
        self.agree_across_ranks = agree_across_ranks
        self._agreement_channel: Any = None
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
        self._timer = timer
        self.save_failures = 0
        self.corrupt_checkpoints = 0
        # guards the health history, the index and every manifest write: note_step
        # runs on the Monitor's background thread while save/restore run on the trainer's
        self._lock = threading.RLock()
        self._unhealthy: set[int] = set()
        self._last_noted: int | None = None
        self._listeners: list[Callable[[CheckpointEvent], None]] = []
        self._backlog: deque[CheckpointEvent] = deque(maxlen=_BACKLOG)
        # folder name -> why it is unusable; reported once, skipped from then on
        # (until a save of that step replaces it)
        self._unusable: dict[str, str] = {}
        # steps whose known-good flag could not be written: retried after the next save
        self._marking_failed: set[int] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        # step -> info of what is on disk; note_step consults this, not the disk
        self._index: dict[int, CheckpointInfo] = {}
        self._refresh_index()

    # ------------------------------------------------------------------ listeners
    def add_listener(self, fn: Callable[[CheckpointEvent], None]) -> None:
        """Call ``fn(event)`` for every :class:`CheckpointEvent` from now on.

        Events that happened while no listener was registered (the newest 32:
        a restore at start-up, corrupt folders found by the constructor) are
        delivered to ``fn`` first. Exceptions ``fn`` raises are logged and ignored.

        Args:
            fn: called on the thread that saves, restores or notes steps, under the
                Checkpointer's lock: keep it quick.
        """
        with self._lock:  # held while replaying: no newer event can overtake the backlog
            self._listeners.append(fn)
            for event in self._backlog:
                self._call(fn, event)
            self._backlog.clear()

    def remove_listener(self, fn: Callable[[CheckpointEvent], None]) -> None:
        """Stop calling ``fn`` (no error if it was not registered).

        Args:
            fn: a function given to :meth:`add_listener`.
        """
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    # ------------------------------------------------------------------ listing
    def _entries(self) -> list[Path]:
        try:
            return list(self.directory.iterdir())
        except OSError as exc:
            log.warning("adamwatch: cannot list checkpoint directory %s: %s", self.directory, exc)
            return []

    def _refresh_index(self) -> None:
        self._index = {info.step: info for info in self.checkpoints()}
        self._marking_failed.clear()

    def checkpoints(self) -> list[CheckpointInfo]:
        """Usable-looking checkpoints on disk (valid manifest), oldest first.

        A folder whose manifest breaks a rule is reported once as corrupt and
        left out; its files are verified only by a restore.

        Returns:
            One :class:`CheckpointInfo` per checkpoint folder with a valid manifest.
        """
        found = []
        with self._lock:
            for entry in self._entries():
                if not entry.name.startswith(FOLDER_PREFIX) or entry.name in self._unusable:
                    continue
                try:
                    if entry.is_symlink() or not entry.is_dir():
                        raise _Unusable("not a directory")
                    found.append(_read_manifest(entry))
                except _Unusable as exc:
                    self._skip_unusable(entry, step_of_folder(entry.name), str(exc))
        return sorted(found, key=lambda info: info.step)

    def _skip_unusable(self, folder: Path, step: int | None, problem: str) -> None:
        """Record, count, log and report an unusable checkpoint (once per folder)."""
        if folder.name in self._unusable:
            return
        self._unusable[folder.name] = problem
        if step is None:
            log.warning("adamwatch: ignoring %s: not a checkpoint folder name (%s)", folder, problem)
            return
        self.corrupt_checkpoints += 1
        log.warning("adamwatch: checkpoint %s is unusable and skipped: %s", folder, problem)
        self._emit("corrupt", step, folder, problem)

    def _remove_leftovers(self) -> None:
        """Delete temporary files and folders of saves and markings that died (never a live writer's)."""
        for entry in self._entries():
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                if _abandoned(entry.name):
                    _remove(entry)
            elif step_of_folder(entry.name) is not None and entry.is_dir() and not entry.is_symlink():
                try:
                    inner = [p for p in entry.iterdir() if p.name.startswith(_TMP_PREFIX)]
                except OSError:
                    continue
                for path in inner:
                    if _abandoned(path.name):
                        _remove(path)

    # --------------------------------------------------------------------- save
    def save(self, step: int) -> Path:
        """Write a checkpoint of everything needed to continue at ``step``.

        Files are serialised straight to disk (no in-memory copy of the whole
        state). The save's duration and size are reported in the ``saved`` event.

        Args:
            step: the optimizer step just completed (the numbering the Monitor
                reports to :meth:`note_step`).

        Returns:
            The checkpoint's folder.

        Raises:
            ValueError: ``step`` is not an int >= 0.
            CheckpointSaveError: the save failed (full disk, no permission, the
                directory vanished, ...): nothing of it is left on disk, earlier
                checkpoints are intact, and the failure is counted
                (``save_failures``) and reported (``save_failed`` event).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be an int >= 0, got {step!r}")
        started = self._timer()
        try:
            final, size = self._write(step)
        except Exception as exc:
            error = CheckpointSaveError(step, self.directory, exc)
            with self._lock:
                self.save_failures += 1
            log.error("adamwatch: %s", error)
            self._emit("save_failed", step, None, str(error), duration_s=self._timer() - started)
            raise error from exc
        self._emit("saved", step, final, None, duration_s=self._timer() - started, size_bytes=size)
        with self._lock:
            self._refresh_index()
            self._update_known_good()
            self._prune()
        return final

    def _write(self, step: int) -> tuple[Path, int]:
        """Write the checkpoint of ``step`` into place; returns (folder, data bytes). Cleans up after any failure."""
        payloads = {
            "model.pt": self._unwrapped_model().state_dict(),
            "optimizer.pt": self.optimizer.state_dict(),
            "trainer.pt": {
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": capture_rng(),
                **saved_config_entries(self.optimizer, self.scheduler, self.scaler),
            },
        }
        tmp = self.directory / _temp_name(_TMP_PREFIX)
        tmp.mkdir()  # no parents: a vanished directory (unmounted disk) must not be recreated elsewhere
        try:
            files = {name: _save_durably(tmp / name, payloads[name]) for name in DATA_FILES}
            with self._lock:
                manifest = encode_manifest(step=step, time=self._clock(), known_good=False, files=files)
                _write_bytes_durably(tmp / MANIFEST, manifest)
                _fsync_dir(tmp)
                final = self.directory / folder_name(step)
                self._move_into_place(tmp, final)
                self._unusable.pop(final.name, None)
        except BaseException:
            _remove(tmp)
            raise
        return final, sum(meta["bytes"] for meta in files.values())

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        # The same step saved again (e.g. after a restore), or an unusable folder
        # of that name: set it aside first, and put it back if the rename fails.
        trash = None
        if final.exists() or final.is_symlink():
            trash = self.directory / _temp_name(_TRASH_PREFIX)
            final.rename(trash)
        try:
            tmp.rename(final)
        except BaseException:
            if trash is not None:
                try:
                    trash.rename(final)
                except OSError as exc:
                    log.error("adamwatch: could not put the previous %s back (%s); it is lost", final.name, exc)
            raise
        try:
            _fsync_dir(self.directory)
        except OSError as exc:
            # The checkpoint is complete and in place; only the rename's durability
            # across a power loss is in doubt.
            log.warning("adamwatch: checkpoint %s saved, but fsync of %s failed: %s", final, self.directory, exc)
        if trash is not None:
            _remove(trash)

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
        trash = self.directory / _temp_name(_TRASH_PREFIX)
        try:
            folder.rename(trash)
        except OSError:
            return
        try:
            _fsync_dir(self.directory)
        except OSError:
            pass
        _remove(trash)

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
            if not info.known_good and info.step not in self._marking_failed and self._verdict(info.step):
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
        tmp = info.path / _temp_name(_TMP_PREFIX, ".json")
        try:
            data = encode_manifest(step=info.step, time=info.time, known_good=value, files=info.files)
            _write_bytes_durably(tmp, data)
            os.replace(tmp, info.path / MANIFEST)
        except OSError as exc:
            _remove(tmp)
            self._marking_failed.add(info.step)
            log.warning("adamwatch: could not set known_good=%s in %s (retried after the next save): %s",
                        value, info.path, exc)
            return False
        try:
            _fsync_dir(info.path)
        except OSError as exc:
            log.warning("adamwatch: manifest of %s rewritten, but fsync of the folder failed: %s", info.path, exc)
        self._index[info.step] = dataclasses.replace(info, known_good=value)
        return True

    # ----------------------------------------------------------------- restore
    def select(self, step: int | None = None, *, before_step: int | None = None) -> int:
        """The step :meth:`restore` would restore now (verifying sizes and checksums).

        Rank 0 calls this to pin ``step=None`` to a concrete step before
        broadcasting a restore to the other ranks. A checkpoint found corrupt
        here is reported and skipped like in :meth:`restore`.

        Args:
            step: an exact step, or None for the newest usable known-good one.
            before_step: with ``step=None``, only checkpoints strictly before it.

        Returns:
            The step.

        Raises:
            NoUsableCheckpointError: nothing usable; the message names the directory.
        """
        _check_restore_args(step, before_step)
        with self._lock:
            for info in self._candidates(step, before_step):
                try:
                    for file in self._open_verified(info):
                        file.close()
                except _Unusable as exc:
                    self._skip_unusable(info.path, info.step, str(exc))
                    continue
                return info.step
        raise NoUsableCheckpointError(self._nothing_usable_message(step, before_step))

    def _candidates(self, step: int | None, before_step: int | None) -> list[CheckpointInfo]:
        self._refresh_index()  # the disk is the truth: another process may have pruned
        infos = sorted(self._index.values(), key=lambda i: i.step)
        if step is not None:
            return [i for i in infos if i.step == step]
        # A flag on disk that this process knows to be wrong (its revocation could
        # not be written) does not count.
        infos = [i for i in infos if i.known_good and self._verdict(i.step) is not False
                 and (before_step is None or i.step < before_step)]
        return list(reversed(infos))

    def _nothing_usable_message(self, step: int | None, before_step: int | None) -> str:
        if step is not None:
            what = f"checkpoint for step {step}"
        elif before_step is not None:
            what = f"known-good checkpoint before step {before_step}"
        else:
            what = "known-good checkpoint"
        return f"no usable {what} in {self.directory}"

    def _open_verified(self, info: CheckpointInfo) -> list[BinaryIO]:
        """Open every data file, check its size and sha256 against the manifest; positioned at 0.

        Loading later reads the same open files, so what is loaded is what was verified.
        """
        opened: list[BinaryIO] = []
        try:
            for name in DATA_FILES:
                meta = info.files[name]
                try:
                    file = _open_regular(info.path / name)
                except FileNotFoundError:
                    raise _Unusable(f"{name} is missing") from None
                except OSError as exc:
                    raise _Unusable(f"{name} cannot be opened: {exc}") from None
                opened.append(file)
                try:
                    size = os.fstat(file.fileno()).st_size
                    if size != meta["bytes"]:
                        raise _Unusable(f"{name} has {size} bytes, its manifest says {meta['bytes']}")
                    digest = hashlib.sha256()
                    for block in iter(lambda: file.read(1 << 20), b""):
                        digest.update(block)
                    file.seek(0)
                except OSError as exc:
                    raise _Unusable(f"{name} cannot be read: {exc}") from None
                if digest.hexdigest() != meta["sha256"]:
                    raise _Unusable(f"{name} sha256 mismatch (expected {meta['sha256']}, got {digest.hexdigest()})")
        except BaseException:
            for file in opened:
                file.close()
            raise
        return opened

    def _live(self) -> dict[str, Any]:
        return {"model": self._unwrapped_model(), "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler}

    def _load_checked(self, info: CheckpointInfo) -> dict[str, Any]:
        """Every file verified and deserialised, and checked against the live objects; nothing live changed."""
        files = self._open_verified(info)
        loaded = {}
        try:
            for name, file in zip(DATA_FILES, files):
                try:
                    loaded[name] = torch.load(file, map_location="cpu", weights_only=self.weights_only)
                except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is unusable
                    raise _Unusable(f"{name} could not be loaded: {type(exc).__name__}: {exc}") from None
        finally:
            for file in files:
                file.close()
        try:
            check_loaded_state(loaded, **self._live())
        except ValueError as exc:
            raise _Unusable(f"does not fit the live objects: {exc}") from None
        return loaded

    def restore(self, step: int | None = None, *, before_step: int | None = None) -> int:
        """Restore model, optimizer, scheduler, scaler and RNG from a checkpoint, all or nothing.

        With ``step=None`` the newest known-good checkpoint (strictly before
        ``before_step`` if given) is used; an unusable one (corrupt, missing,
        unloadable, or not fitting the live objects) is reported ("corrupt"
        event, log) and the next older known-good one is tried. An explicit
        ``step`` is restored whether known-good or not, with no fallback.

        Nothing live changes until a checkpoint has been read completely, every
        file's size and sha256 verified, every state dict deserialised and
        checked against the live model, optimizer, scheduler, scaler and RNG
        (:mod:`adamwatch.checkpoint_state`); then the parts are applied in an
        order that is undone if one fails. So a failed restore leaves the run
        exactly as it was. The price is memory: the checkpoint's whole state
        (one extra copy of the model and optimizer state) is held in host
        memory while it is checked and applied.

        After a restore, checkpoints newer than the restored one belong to the
        abandoned trajectory and are deleted, the health history after the
        restored step is forgotten, and ``on_restore(step)`` is called.

        Args:
            step: an exact step (int >= 0) to restore, or None.
            before_step: only with ``step=None``: the incident's step.

        Returns:
            The restored step.

        Under torch.distributed (see ``agree_across_ranks``) every rank
        restores the same step, the newest usable on every rank, or none.

        Raises:
            ValueError: bad arguments.
            NoUsableCheckpointError: nothing usable (reported as a
                ``restore_failed`` event); the message names the directory.
            CheckpointConfigMismatchError: (a NoUsableCheckpointError) the
                candidates were saved with another optimizer configuration;
                ``differences`` and the message list the fields.
        """
        _check_restore_args(step, before_step)
        started = self._timer()
        with self._lock:
            channel = self._agreement()
            if channel is None:
                restored, problems, mismatches = self._restore_here(step, before_step)
            else:
                restored, problems, mismatches = self._restore_agreed(step, before_step, channel)
            if restored is None:
                message = (f"{self._nothing_usable_message(step, before_step)}; "
                           f"the model, optimizer, scheduler, scaler and RNG were left as they were")
                if problems:
                    message += " (" + "; ".join(problems) + ")"
                asked = step if step is not None else (self._last_noted or 0)
                self._emit("restore_failed", asked, None, message, duration_s=self._timer() - started)
                if mismatches:
                    raise CheckpointConfigMismatchError(message, mismatches)
                raise NoUsableCheckpointError(message)
            for info in self.checkpoints():
                if info.step > restored.step:
                    self._delete(info.path)
            self._refresh_index()
            self._unhealthy = {s for s in self._unhealthy if s <= restored.step}
            self._last_noted = restored.step
        scales = current_lr_scales(self.optimizer)
        self._emit("restored", restored.step, restored.path, None, duration_s=self._timer() - started,
                   size_bytes=restored.size_bytes, lr_scale=min(scales) if scales else 1.0)
        if self.on_restore is not None:
            self.on_restore(restored.step)
        return restored.step

    # ----------------------------------------------------------------- restore parts
    def _prepare(self, info: CheckpointInfo, mismatches: dict[int, list[str]]) -> tuple[dict[str, Any] | None, str | None]:
        """Load, verify and check one checkpoint against the live objects and configuration; nothing live changes.

        Returns:
            (the loaded state, None) or (None, why it cannot be restored).
        """
        try:
            loaded = self._load_checked(info)
        except _Unusable as exc:
            self._skip_unusable(info.path, info.step, str(exc))
            return None, f"step {info.step}: {exc}"
        differences = config_differences(loaded["trainer.pt"], self.optimizer, self.scheduler, self.scaler)
        if differences:
            what = (f"checkpoint of step {info.step} was saved with another optimizer configuration "
                    f"(checkpoint -> live): {'; '.join(differences)}")
            if self.on_mismatch == "refuse":
                mismatches[info.step] = differences
                log.warning("adamwatch: %s; refused (Checkpointer(on_mismatch='warn') accepts it)", what)
                return None, what
            log.warning("adamwatch: %s; restored anyway (on_mismatch='warn'): the checkpoint's "
                        "hyperparameters are in force now", what)
        return loaded, None

    def _apply(self, info: CheckpointInfo, loaded: dict[str, Any]) -> str | None:
        """Put a prepared checkpoint back (all or nothing); returns why it failed, or None."""
        try:
            apply_loaded_state(loaded, **self._live())
        except Exception as exc:  # noqa: BLE001 - a load_state_dict raised; the parts applied were undone
            problem = f"could not be applied: {type(exc).__name__}: {exc}"
            self._skip_unusable(info.path, info.step, problem)
            return f"step {info.step}: {problem}"
        return None

    def _restore_here(self, step: int | None, before_step: int | None
                      ) -> tuple[CheckpointInfo | None, list[str], dict[int, list[str]]]:
        """One process: the newest candidate that loads, fits and applies."""
        problems: list[str] = []
        mismatches: dict[int, list[str]] = {}
        for info in self._candidates(step, before_step):
            loaded, problem = self._prepare(info, mismatches)
            if loaded is not None:
                problem = self._apply(info, loaded)
                loaded = None  # release the host copy before trying an older checkpoint
                if problem is None:
                    return info, problems, mismatches
            problems.append(problem or f"step {info.step}: unusable")
        return None, problems, mismatches

    def _agreement(self) -> Any:
        """The gloo group that restores agree over, or None when this process restores alone."""
        if self.agree_across_ranks is False:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self.agree_across_ranks is True:
                raise RuntimeError("agree_across_ranks=True, but torch.distributed is not initialised")
            return None
        if dist.get_world_size() < 2 and self.agree_across_ranks == "auto":
            return None
        if self._agreement_channel is None:
            # Blocking collectives are fine here (a restore is off the step path), but
            # they must not go through NCCL's device stream: use gloo on the CPU.
            if str(dist.get_backend()).lower() == "gloo":
                # Not dist.group.WORLD itself: a Checkpointer kept alive (by a cycle)
                # until interpreter shutdown must not hold a process group then
                # (freeing a gloo group during shutdown aborts the process).
                self._agreement_channel = _DEFAULT_GROUP
            else:
                self._agreement_channel = dist.new_group(backend="gloo")  # a collective: every rank restores
        return self._agreement_channel

    def agrees_across_ranks(self) -> bool:
        """Whether restore() chooses its step together with the other ranks (see ``agree_across_ranks``)."""
        if self.agree_across_ranks is False:
            return False
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return False
        return self.agree_across_ranks is True or dist.get_world_size() > 1

    @staticmethod
    def _gather(channel: Any, obj: Any) -> list[Any]:
        import torch.distributed as dist

        group = None if channel is _DEFAULT_GROUP else channel
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def _restore_agreed(self, step: int | None, before_step: int | None, channel: Any
                        ) -> tuple[CheckpointInfo | None, list[str], dict[int, list[str]]]:
        """Every rank restores the same step: the newest usable on every rank, or none at all.

        Round 1 gathers each rank's checksum-verified candidates; each later
        round tries the newest common step on every rank (load, fit, configuration)
        and gathers the verdicts, dropping that step everywhere when one rank
        cannot use it. Each round removes a step, so it ends.
        """
        problems: list[str] = []
        mismatches: dict[int, list[str]] = {}
        candidates = {info.step: info for info in self._candidates(step, before_step)}
        verified = []
        for info in candidates.values():
            try:
                for file in self._open_verified(info):
                    file.close()
            except _Unusable as exc:
                self._skip_unusable(info.path, info.step, str(exc))
                problems.append(f"step {info.step}: {exc}")
                continue
            verified.append(info.step)
        per_rank = [set(steps) for steps in self._gather(channel, sorted(verified))]
        common = set.intersection(*per_rank)
        while common:
            chosen = max(common)
            loaded, problem = self._prepare(candidates[chosen], mismatches)
            verdicts = self._gather(channel, problem)
            if all(v is None for v in verdicts):
                assert loaded is not None
                problem = self._apply(candidates[chosen], loaded)
                loaded = None
                failed = [r for r, v in enumerate(self._gather(channel, problem)) if v is not None]
                if failed:
                    # Not expected (every rank loaded and checked the state first); say it loudly.
                    log.error("adamwatch: restoring step %d failed on ranks %s after every rank had checked it: "
                              "the ranks may now disagree", chosen, failed)
                    if problem is not None:
                        problems.append(problem)
                        return None, problems, mismatches
                return candidates[chosen], problems, mismatches
            loaded = None
            problems.extend(f"rank {r}: {v}" for r, v in enumerate(verdicts) if v is not None)
            common.discard(chosen)
        shown = ", ".join(f"rank {r}: {sorted(steps) or 'none'}" for r, steps in enumerate(per_rank))
        problems.append(f"no checkpoint is usable on every rank (usable steps per rank: {shown})")
        return None, problems, mismatches

    # ------------------------------------------------------------------ events
    def _emit(self, kind: str, step: int, path: Path | None, detail: str | None, *,
              duration_s: float | None = None, size_bytes: int | None = None, lr_scale: float | None = None) -> None:
        event = CheckpointEvent(kind, step, self._clock(), str(path) if path is not None else None, detail,
                                duration_s, size_bytes, lr_scale)
        if self.on_event is not None:
            try:
                self.on_event(kind, step, event.path, detail)
            except Exception:  # noqa: BLE001 - a callback must never break a save
                log.exception("adamwatch: checkpoint on_event callback failed")
        # Listeners run under the lock, so they see events in the order they happened.
        with self._lock:
            if not self._listeners:
                self._backlog.append(event)
            for fn in list(self._listeners):
                self._call(fn, event)

    @staticmethod
    def _call(fn: Callable[[CheckpointEvent], None], event: CheckpointEvent) -> None:
        try:
            fn(event)
        except Exception:  # noqa: BLE001 - a listener must never break a save or a restore
            log.exception("adamwatch: checkpoint listener %r failed", fn)


def _check_restore_args(step: Any, before_step: Any) -> None:
    for name, value in (("step", step), ("before_step", before_step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}: must be an int >= 0 or None, got {value!r}")
    if step is not None and before_step is not None:
        raise ValueError("before_step: only allowed when step is None")
