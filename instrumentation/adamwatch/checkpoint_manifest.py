"""The manifest of a checkpoint folder, read strictly: anything unexpected makes the folder unusable.

Every checkpoint folder ``step-000000000150/`` holds ``manifest.json``, written
last, in this exact shape (format 1)::

    {"format": 1, "step": 150, "time": 1700000000.0, "known_good": false,
     "files": {"model.pt":     {"sha256": "<64 lowercase hex>", "bytes": 52113},
               "optimizer.pt": {"sha256": "...", "bytes": 104711},
               "trainer.pt":   {"sha256": "...", "bytes": 3021}}}

:func:`parse_manifest` accepts exactly that and raises :class:`InvalidManifestError`
naming the field otherwise:

| rule | why |
| --- | --- |
| at most ``MAX_MANIFEST_BYTES`` of UTF-8 JSON, nesting at most ``MAX_DEPTH`` deep | a hostile or garbled file costs bounded memory and time, never a RecursionError |
| no ``NaN``/``Infinity``; exactly the keys above, no others | nothing unknown is accepted silently; a newer layout bumps ``format`` |
| ``format`` is the integer 1 | |
| ``step`` an int (not a bool) in ``[0, 2**63)``, equal to the folder's step; the folder's name is the canonical one | "restored step 99" must never bring back step 30's weights |
| ``time`` a finite number >= 0 | ``Infinity`` would crash ``float()`` users later |
| ``known_good`` the JSON literal ``true`` or ``false`` | the string ``"false"`` is truthy |
| ``files`` exactly ``model.pt``, ``optimizer.pt``, ``trainer.pt``, each ``{"sha256", "bytes"}`` | names are fixed, so no entry can point outside the folder |

    >>> info = parse_manifest(Path("ckpt/step-000000000007"), encode_manifest(
    ...     step=7, time=1.5, known_good=True,
    ...     files={name: {"sha256": "0" * 64, "bytes": 1} for name in DATA_FILES}))
    >>> info.step, info.known_good
    (7, True)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointInfo",
    "InvalidManifestError",
    "DATA_FILES",
    "FOLDER_PREFIX",
    "MANIFEST",
    "FORMAT",
    "MAX_MANIFEST_BYTES",
    "MAX_DEPTH",
    "folder_name",
    "step_of_folder",
    "parse_manifest",
    "encode_manifest",
]

FOLDER_PREFIX = "step-"
MANIFEST = "manifest.json"
FORMAT = 1
#: the data files of a checkpoint, in the order they are written and loaded
DATA_FILES: tuple[str, ...] = ("model.pt", "optimizer.pt", "trainer.pt")
# A real manifest is about 500 bytes; 64 KiB leaves room and bounds what we parse.
MAX_MANIFEST_BYTES = 64 * 1024
# The schema nests three levels deep (manifest > files > entry).
MAX_DEPTH = 3

_INT_LIMIT = 2**63  # what the wire and Prometheus can carry
_KEYS = frozenset({"format", "step", "time", "known_good", "files"})
_FILE_KEYS = frozenset({"sha256", "bytes"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FOLDER = re.compile(re.escape(FOLDER_PREFIX) + r"([0-9]{12,})")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


class InvalidManifestError(ValueError):
    """A checkpoint folder's manifest breaks a rule; the message names the field."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk whose manifest passed :func:`parse_manifest`.

    Args:
        step: the optimizer step it holds (equal to its folder's).
        path: its folder.
        time: unix seconds when it was saved.
        known_good: proven good by the healthy steps around it.
        files: ``{name: {"sha256": hex, "bytes": int}}`` for every name in ``DATA_FILES``.
    """

    step: int
    path: Path
    time: float
    known_good: bool
    files: dict[str, dict[str, Any]]

    @property
    def size_bytes(self) -> int:
        """Bytes of its data files (the manifest not included)."""
        return sum(meta["bytes"] for meta in self.files.values())


def folder_name(step: int) -> str:
    """The canonical folder name of a checkpoint of ``step``: ``step-`` and at least 12 digits.

    Args:
        step: the optimizer step.

    Returns:
        e.g. ``"step-000000000150"``.
    """
    return f"{FOLDER_PREFIX}{step:012d}"


def step_of_folder(name: str) -> int | None:
    """The step a canonically named checkpoint folder holds, or None for any other name.

    Args:
        name: a folder's name (not its path).

    Returns:
        The step, or None when ``name`` is not exactly ``folder_name(step)``.
    """
    match = _FOLDER.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if folder_name(step) == name and step < _INT_LIMIT else None


def _reject_constant(name: str) -> None:
    raise InvalidManifestError(f"manifest: {name} is not allowed (numbers must be finite)")


def _depth(text: str) -> int:
    """Deepest nesting of objects/arrays in JSON text, ignoring brackets inside strings."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exact_keys(where: str, value: Any, expected: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidManifestError(f"{where}: must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - expected)
    missing = sorted(expected - set(value))
    if unknown or missing:
        parts = ([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
        raise InvalidManifestError(f"{where}: keys must be exactly {sorted(expected)} ({', '.join(parts)})")
    return value


def _file_entries(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise InvalidManifestError(f"files: must be an object, got {type(value).__name__}")
    for name in value:
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise InvalidManifestError(f"files: {name!r} is not a plain file name inside the checkpoint folder")
    _exact_keys("files", value, frozenset(DATA_FILES))
    entries = {}
    for name in DATA_FILES:
        entry = _exact_keys(f"files.{name}", value[name], _FILE_KEYS)
        digest, size = entry["sha256"], entry["bytes"]
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise InvalidManifestError(f"files.{name}.sha256: must be 64 lowercase hex digits, got {digest!r:.80}")
        if not _is_int(size) or not 0 <= size < _INT_LIMIT:
            raise InvalidManifestError(f"files.{name}.bytes: must be an int in [0, 2**63), got {size!r:.80}")
        entries[name] = {"sha256": digest, "bytes": size}
    return entries


def parse_manifest(folder: Path, raw: bytes) -> CheckpointInfo:
    """Check a manifest's bytes against every rule and return what it describes.

    Args:
        folder: the checkpoint folder the manifest was read from (its name must
            be ``folder_name(step)``).
        raw: the manifest's bytes; callers read at most ``MAX_MANIFEST_BYTES + 1``.

    Returns:
        The :class:`CheckpointInfo`.

    Raises:
        InvalidManifestError: naming the first rule broken.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifestError(f"manifest: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidManifestError(f"manifest: not UTF-8 ({exc})") from None
    if _depth(text) > MAX_DEPTH:
        raise InvalidManifestError(f"manifest: nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except InvalidManifestError:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidManifestError(f"manifest: not valid JSON ({exc})") from None
    data = _exact_keys("manifest", data, _KEYS)
    if not _is_int(data["format"]) or data["format"] != FORMAT:
        raise InvalidManifestError(f"format: must be {FORMAT}, got {data['format']!r:.80}")
    step = data["step"]
    if not _is_int(step) or not 0 <= step < _INT_LIMIT:
        raise InvalidManifestError(f"step: must be an int in [0, 2**63), got {step!r:.80}")
    folder_step = step_of_folder(folder.name)
    if folder_step is None:
        raise InvalidManifestError(f"step: folder name {folder.name!r:.80} is not the canonical {folder_name(step)!r}")
    if folder_step != step:
        raise InvalidManifestError(f"step: the manifest says {step}, its folder {folder.name!r} holds step {folder_step}")
    saved_at = data["time"]
    if not (_is_int(saved_at) or isinstance(saved_at, float)) or not math.isfinite(saved_at) or saved_at < 0:
        raise InvalidManifestError(f"time: must be a finite number >= 0, got {saved_at!r:.80}")
    known_good = data["known_good"]
    if not isinstance(known_good, bool):
        raise InvalidManifestError(f"known_good: must be true or false, got {known_good!r:.80}")
    return CheckpointInfo(step=step, path=folder, time=float(saved_at), known_good=known_good,
                          files=_file_entries(data["files"]))


def encode_manifest(*, step: int, time: float, known_good: bool, files: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The manifest's bytes for a checkpoint (what :func:`parse_manifest` accepts).

    Args:
        step: the optimizer step.
        time: unix seconds of the save.
        known_good: the known-good flag.
        files: ``{name: {"sha256": hex, "bytes": int}}`` for every name in ``DATA_FILES``.

    Returns:
        UTF-8 JSON.
    """
    manifest = {
        "format": FORMAT,
        "step": step,
        "time": time,
        "known_good": known_good,
        "files": {name: {"sha256": files[name]["sha256"], "bytes": files[name]["bytes"]} for name in DATA_FILES},
    }
    return json.dumps(manifest, indent=1, allow_nan=False).encode()
