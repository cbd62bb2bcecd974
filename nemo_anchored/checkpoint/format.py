"""The on-disk checkpoint format: what makes a directory a complete checkpoint, and how one is
published. Plain files only (no torch, no megatron), so every layer can read it.

A checkpoint is a directory ``<root>/<name>/`` holding megatron-core ``dist_checkpointing``
files (see ``nemo_anchored.checkpoint.sharded``, docs/design/checkpoint_format.md) and, written
last, the completeness marker ``complete.json``: format version, global step, save time,
layout, vocabulary size, which parts are present, a JSON copy of rank 0's trainer state, and the
size and checksum of every other file (``file_record``, checked by ``verify_files``).

Atomicity: a checkpoint is filled under the sibling ``<name>.tmp``; ``publish`` writes the
marker into it (durably) and renames it to ``<name>``. A directory without the marker (a crash
mid-save) is never loaded; ``scan_checkpoints`` skips ``*.tmp``, reports unmarked directories
and never deletes them (another job may be writing there). A tool that adds its own files to a
freshly saved checkpoint (conversion) does so inside ``amend``, which withholds the marker
until they are all written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from nemo_anchored.atomic import TMP_SUFFIX, replace_directory
from nemo_anchored.errors import UserError

FORMAT_VERSION = 1
MARKER = "complete.json"
_PENDING_MARKER = MARKER + ".pending"
# The marker's table of every other file of the checkpoint: {name: {"bytes": .., "crc32": ..}}.
# Checkpoints saved before it existed have none (nothing to verify) and still load.
_FILES = "files"
# The marker's fields that code compares or indexes, with their types (where present: a marker
# damaged by hand into other valid JSON is refused here, not met as a TypeError later).
_MARKER_TYPES = {"global_step": ((int, type(None)), "an integer or null"),
                 "saved_at": ((int, float), "a number"), "contents": (list, "a list"),
                 "layout": (dict, "an object"), "state": (dict, "an object"),
                 _FILES: (dict, "an object")}
# Files that make a directory look like a checkpoint: the marker, or dist_checkpointing's.
_CHECKPOINT_FILES = (MARKER, _PENDING_MARKER, "metadata.json", ".metadata", "common.pt")
_HF_CONFIG = "config.json"  # a Hugging Face model folder; converted checkpoints keep it in hf/
_READ_CHUNK = 16 << 20


class CheckpointError(RuntimeError, UserError):
    """A checkpoint that is missing, incomplete, or does not fit what is being loaded."""


def _json_default(value):
    if hasattr(value, "tolist"):  # tensors and numpy values in metric accumulators
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def check_serialisable(marker: Dict[str, Any]) -> None:
    """Raise before any data is written if ``marker`` cannot become ``complete.json``."""
    json.dumps(marker, default=_json_default)


def publish(staged: Path, path: Path, marker: Dict[str, Any]) -> None:
    """Mark the filled directory ``staged`` complete and rename it to ``path`` (replacing an
    older checkpoint of that name: see ``atomic.replace_directory``)."""
    with open(staged / MARKER, "w") as f:
        json.dump(marker, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    replace_directory(staged, path)


@contextlib.contextmanager
def amend(saved: Path, path: Path) -> Iterator[Path]:
    """Add files to the complete checkpoint ``saved``, then move it to ``path``.

    The marker is withdrawn for the duration of the block, so that a directory caught half way
    (a crash, an error in the block) never loads; it is put back, and the directory renamed
    to ``path``, only when the block ends without an error. Yields ``saved``.
    """
    os.replace(saved / MARKER, saved / _PENDING_MARKER)
    yield saved
    os.replace(saved / _PENDING_MARKER, saved / MARKER)
    replace_directory(saved, path)


def read_marker(path: Path) -> Dict[str, Any]:
    """The marker of a complete checkpoint at ``path``; raises ``CheckpointError`` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    if path.name.endswith(TMP_SUFFIX):
        # Never loaded, even with a marker: the next save of that name deletes it.
        latest = scan_checkpoints(path.parent).latest
        use = (f"use {latest}, the latest complete checkpoint there" if latest is not None
               else f"there is no complete checkpoint in {path.parent}")
        raise CheckpointError(f"checkpoint {path} is an incomplete save (a {TMP_SUFFIX} "
                              f"directory is where a save is staged): {use}")
    marker_path = path / MARKER
    if not marker_path.is_file():
        if (path / _HF_CONFIG).is_file():
            raise CheckpointError(
                f"checkpoint {path} is a Hugging Face model folder, not a converted checkpoint: "
                f"convert it with `nemo-anchored convert hf-to-mcore --hf {path} --out OUT` "
                f"and use OUT"
            )
        if not _looks_like_checkpoint(path):
            raise CheckpointError(f"{path} is not a checkpoint (no {MARKER}, no checkpoint "
                                  f"files){_checkpoints_inside(path)}")
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no {MARKER} (the save did not finish)"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER}: {err}") from err
    if not isinstance(marker, dict):
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER}: not a JSON object")
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version}, this code reads {FORMAT_VERSION}"
        )
    for key, (kinds, what) in _MARKER_TYPES.items():
        value = marker.get(key)
        if key in marker and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(f"checkpoint {path}: unreadable {MARKER}: {key!r} is "
                                  f"{value!r}, not {what}")
    return marker


@dataclasses.dataclass
class CheckpointScan:
    """What ``scan_checkpoints`` found directly under a folder."""

    latest: Optional[Path]  # the complete checkpoint to resume from, or None
    # Directories that look like checkpoints but cannot be used, each with the reason.
    skipped: List[Tuple[Path, str]]


def _checkpoints_inside(folder: Path) -> str:
    """Where the checkpoint probably meant is, for a folder that is none: a run's final weights,
    or the newest complete checkpoint of a folder of them (a run's, or its checkpoints/)."""
    final = folder / "final"
    if (final / MARKER).is_file():
        return f"; a run directory? its final weights are {final}"
    for root in (folder, folder / "checkpoints"):
        latest = scan_checkpoints(root).latest if root.is_dir() else None
        if latest is not None:
            return f"; the newest complete checkpoint inside is {latest}"
    return ""


def _looks_like_checkpoint(path: Path) -> bool:
    return (any((path / name).exists() for name in _CHECKPOINT_FILES)
            or any(path.glob("*.distcp")))


def scan_checkpoints(root) -> CheckpointScan:
    """The checkpoints directly under ``root`` (only read, never deleted or changed).

    ``latest``: the complete one with the highest global step (newest save time among equals),
    or None. A ``<name>.old`` left by a crash in the middle of re-saving ``<name>`` is complete
    and counts like any other checkpoint. ``skipped``: every other directory holding a marker or
    checkpoint files whose marker is missing, unreadable or of another format version, with
    the ``CheckpointError`` text; ``*.tmp`` directories (saves in progress or crashed) are not
    reported.
    """
    root = Path(root)
    scan = CheckpointScan(latest=None, skipped=[])
    if not root.is_dir():
        return scan
    best_key = None
    for child in sorted(root.iterdir()):
        if (not child.is_dir() or child.name.endswith(TMP_SUFFIX)
                or not _looks_like_checkpoint(child)):
            continue
        try:
            marker = read_marker(child)
        except CheckpointError as err:
            scan.skipped.append((child, str(err)))
            continue
        step = marker.get("global_step")
        key = (-1 if step is None else step, marker.get("saved_at", 0.0))
        if best_key is None or key > best_key:
            scan.latest, best_key = child, key
    return scan


def latest_checkpoint(root) -> Optional[Path]:
    """``scan_checkpoints(root).latest``: the complete checkpoint to resume from, or None."""
    return scan_checkpoints(root).latest


# ------------------------------------------------------------------------------- checksums


def file_record(path: Path) -> Dict[str, Any]:
    """The size and checksum the marker records for one file of a checkpoint.

    CRC-32 (zlib), not a cryptographic hash: what it must catch is accidental damage (flipped
    bits, a torn or truncated write, a file replaced by another job's), and CRC-32 detects
    every error burst up to 32 bits and all but 2**-32 of the rest, at ~3 GB/s per core here
    against ~0.7 GB/s for SHA-256, so hashing costs a fraction of writing the file. The size
    alone already catches truncation.
    """
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        # One buffer, reused: no larger than the file (most files of a checkpoint are small).
        buffer = bytearray(max(1, min(_READ_CHUNK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while count := f.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
            size += count
    return {"bytes": size, "crc32": f"{crc:08x}"}


def recorded_files(marker: Dict[str, Any]) -> List[str]:
    """The names of the files whose checksums ``marker`` records (none for a checkpoint saved
    before checksums were recorded)."""
    return sorted(marker.get(_FILES) or {})


def record_files(marker: Dict[str, Any], records: Dict[str, Dict[str, Any]]) -> None:
    """Put ``records`` ({file name: ``file_record``}) into ``marker``."""
    marker[_FILES] = dict(sorted(records.items()))


def verify_files(path: Path, marker: Dict[str, Any],
                 names: Optional[Iterable[str]] = None) -> None:
    """Check the files of the checkpoint at ``path`` against the sizes and checksums recorded in
    its ``marker`` (``names``: only those of them; default: all). Raises ``CheckpointError``
    naming the first file that is missing, truncated or corrupt."""
    path = Path(path)
    recorded = marker.get(_FILES) or {}
    for name in recorded_files(marker) if names is None else names:
        expected, file = recorded[name], path / name
        try:
            size = file.stat().st_size
            actual = file_record(file) if size == expected["bytes"] else None
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path}: file {name} is missing") from None
        except OSError as err:
            raise CheckpointError(f"checkpoint {path}: file {name} cannot be read: {err}") \
                from err
        if actual is None:
            damage = "truncated" if size < expected["bytes"] else "corrupt"
            raise CheckpointError(f"checkpoint {path}: file {name} is {damage}: "
                                  f"{size} bytes, {expected['bytes']} when saved")
        if actual["crc32"] != expected["crc32"]:
            raise CheckpointError(f"checkpoint {path}: file {name} is corrupt: checksum mismatch")
