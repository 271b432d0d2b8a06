"""Issue 10 finding 5: every corrupt manifest is rejected, skipped like a corrupt checkpoint, and never crashes.

Each case damages the newest of three known-good checkpoints (4, 8, 12). Today's
code crashed (OverflowError, AttributeError, RecursionError), restored the damaged
one, or restored the wrong weights; now a fresh ``Checkpointer`` opens the
directory, reports step 12 as ``corrupt`` exactly once, counts it, and
``restore()`` brings back step 8's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from adamwatch.checkpoint import Checkpointer, NoUsableCheckpointError
from adamwatch.checkpoint_manifest import MAX_MANIFEST_BYTES, InvalidManifestError, encode_manifest, parse_manifest

from ._checkpoints import Events, good_checkpoints, setup

NEWEST = "step-000000000012"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Three known-good checkpoints, built once and copied by every case."""
    directory = tmp_path_factory.mktemp("template")
    good_checkpoints(directory, {4, 8, 12})
    return directory


def _edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _replace_text(old: str, new: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        text = (folder / "manifest.json").read_text()
        assert old in text
        (folder / "manifest.json").write_text(text.replace(old, new, 1))

    return damage


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / "manifest.json").write_bytes(data)


def _point_model_at_step_4(folder: Path) -> None:
    # the classic traversal: a file "inside" the checkpoint that lives in another folder
    manifest = json.loads((folder / "manifest.json").read_text())
    older = json.loads((folder.parent / "step-000000000004" / "manifest.json").read_text())
    manifest["files"]["../step-000000000004/model.pt"] = older["files"]["model.pt"]
    del manifest["files"]["model.pt"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _symlink_model_outside(folder: Path) -> None:
    # checksums match, but the bytes live outside the folder
    outside = folder.parent / "elsewhere.pt"
    shutil.copy(folder / "model.pt", outside)
    (folder / "model.pt").unlink()
    (folder / "model.pt").symlink_to(outside)


def _symlink_manifest(folder: Path) -> None:
    real = folder.parent / "manifest-copy.json"
    shutil.copy(folder / "manifest.json", real)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to(real)


def _fifo_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")  # reading it would wait for a writer forever


def _deeply_nested(folder: Path) -> None:
    depth = 20_000  # 40 KB: under the size limit, far over Python's recursion limit
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}")


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (damage to step 12's folder, what the corrupt event's detail names)
    "step Infinity": (_replace_text('"step": 12', '"step": Infinity'), "Infinity is not allowed"),
    "step NaN": (_replace_text('"step": 12', '"step": NaN'), "NaN is not allowed"),
    "step a string": (_edit_json(lambda m: m.update(step="12")), "step: must be an int"),
    "step a bool": (_edit_json(lambda m: m.update(step=True)), "step: must be an int"),
    "step not the folder's": (_edit_json(lambda m: m.update(step=99)), "the manifest says 99"),
    "time Infinity": (_replace_text('"time": ', '"time": Infinity, "x": '), "Infinity is not allowed"),
    "time negative": (_edit_json(lambda m: m.update(time=-1.0)), "time: must be a finite number"),
    "known_good the string false": (_edit_json(lambda m: m.update(known_good="false")), "known_good: must be true or false"),
    "known_good 1": (_edit_json(lambda m: m.update(known_good=1)), "known_good: must be true or false"),
    "format 2": (_edit_json(lambda m: m.update(format=2)), "format: must be 1"),
    "unknown key": (_edit_json(lambda m: m.update(comment="hi")), "unknown ['comment']"),
    "missing key": (_edit_json(lambda m: m.pop("time")), "missing ['time']"),
    "files entries are strings": (_edit_json(lambda m: m.update(files={k: "x" for k in m["files"]})),
                                  "files.model.pt: must be an object"),
    "files a list": (_edit_json(lambda m: m.update(files=list(m["files"]))), "files: must be an object"),
    "extra file entry": (_edit_json(lambda m: m["files"].update({"notes.txt": m["files"]["model.pt"]})),
                         "unknown ['notes.txt']"),
    "file name outside the folder": (_point_model_at_step_4, "not a plain file name"),
    "sha256 uppercase": (_edit_json(lambda m: m["files"]["model.pt"].update(sha256=m["files"]["model.pt"]["sha256"].upper())),
                         "64 lowercase hex"),
    "bytes negative": (_edit_json(lambda m: m["files"]["trainer.pt"].update(bytes=-1)), "files.trainer.pt.bytes"),
    "bytes a float": (_edit_json(lambda m: m["files"]["trainer.pt"].update(bytes=3021.0)), "files.trainer.pt.bytes"),
    "extra key in a file entry": (_edit_json(lambda m: m["files"]["optimizer.pt"].update(path="/etc/passwd")),
                                  "unknown ['path']"),
    "top level a list": (_write_bytes(b"[1, 2]"), "manifest: must be an object"),
    "empty": (_write_bytes(b""), "not valid JSON"),
    "not UTF-8": (_write_bytes(b'{"step": "\xff"}'), "not UTF-8"),
    "too large": (_replace_text("{", "{" + " " * MAX_MANIFEST_BYTES), "larger than"),
    "deeply nested": (_deeply_nested, "nested deeper than"),
    "manifest a symlink": (_symlink_manifest, "manifest.json cannot be read"),
    "manifest a FIFO": (_fifo_manifest, "not a regular file"),
    "data file a symlink": (_symlink_model_outside, "model.pt cannot be opened"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_manifest_is_skipped_like_a_corrupt_checkpoint(template: Path, tmp_path: Path, case: str) -> None:
    damage, reason = CASES[case]
    directory = tmp_path / "ckpt"
    shutil.copytree(template, directory, symlinks=True)
    damage(directory / NEWEST)
    expected = torch.load(directory / "step-000000000008" / "model.pt", weights_only=True)

    events = Events()
    model, optimizer, scheduler, _ = setup(seed=5, with_scaler=False)
    opened: list[Checkpointer] = []
    # the FIFO case would block a reader forever: bound the constructor in time
    thread = threading.Thread(target=lambda: opened.append(Checkpointer(
        directory, model=model, optimizer=optimizer, scheduler=scheduler, good_window=2, on_event=events)))
    thread.start()
    thread.join(30)
    assert opened, "Checkpointer() did not return"
    ckpt = opened[0]

    assert ckpt.restore() == 8
    assert [i.step for i in ckpt.checkpoints()] == [4, 8]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    (kind, step, path, detail), = [e for e in events.seen if e[0] == "corrupt"]
    assert step == 12 and path == str(directory / NEWEST)
    assert reason in detail, detail
    assert ckpt.corrupt_checkpoints == 1  # listed several times above, counted once


def test_explicit_step_of_a_mislabelled_folder_is_not_restored(template: Path, tmp_path: Path) -> None:
    """Finding 5: a folder step-99 holding step 8's checkpoint must not restore "step 99" with step 8's weights."""
    directory = tmp_path / "ckpt"
    shutil.copytree(template, directory)
    shutil.copytree(directory / "step-000000000008", directory / "step-000000000099")
    events = Events()
    model, optimizer, scheduler, _ = setup(seed=5, with_scaler=False)
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, on_event=events)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoUsableCheckpointError, match="step 99"):
        ckpt.restore(step=99)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "the manifest says 8" in events.details("corrupt")[0]
    assert events.kinds("restore_failed") == [99]


def test_non_checkpoint_names_are_ignored_without_crashing(template: Path, tmp_path: Path) -> None:
    """Finding 5: odd entries named like checkpoints (a file, a short name, a symlinked folder) never crash."""
    directory = tmp_path / "ckpt"
    shutil.copytree(template, directory)
    (directory / "step-000000000020").write_text("not a folder")
    shutil.copytree(directory / "step-000000000012", directory / "step-12")
    (directory / "step-000000000030").symlink_to(directory / "step-000000000012")
    events = Events()
    model, optimizer, scheduler, _ = setup(seed=5, with_scaler=False)
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler, on_event=events)
    assert [i.step for i in ckpt.checkpoints()] == [4, 8, 12]
    assert ckpt.restore() == 12
    assert sorted(events.kinds("corrupt")) == [20, 30]  # "step-12" is not a checkpoint name: logged only


def test_parse_manifest_accepts_exactly_what_encode_manifest_writes() -> None:
    files = {name: {"sha256": "ab" * 32, "bytes": 7} for name in ("model.pt", "optimizer.pt", "trainer.pt")}
    raw = encode_manifest(step=150, time=1.7e9, known_good=False, files=files)
    info = parse_manifest(Path("d/step-000000000150"), raw)
    assert (info.step, info.time, info.known_good, info.files, info.size_bytes) == (150, 1.7e9, False, files, 21)
    with pytest.raises(InvalidManifestError, match="canonical"):
        parse_manifest(Path("d/step-150"), raw)
    with pytest.raises(ValueError, match="(?i)nan"):  # the writer refuses what the reader would
        encode_manifest(step=1, time=float("nan"), known_good=False, files=files)


def test_module_docstring_example_runs() -> None:
    import doctest

    import adamwatch.checkpoint_manifest

    result = doctest.testmod(adamwatch.checkpoint_manifest)
    assert result.attempted > 0 and result.failed == 0
