"""The on-disk checkpoint format: what makes a directory a complete checkpoint, and how one is
published. Plain files only (no torch, no megatron), so every layer can read it.

A checkpoint is a directory ``<root>/<name>/`` holding megatron-core ``dist_checkpointing``
files (see ``nemo_anchored.checkpoint.sharded``, docs/design/checkpoint_format.md) and, written
last, the completeness marker ``complete.json``: format version, global step, save time,
layout, vocabulary size, which parts are present, and a JSON copy of rank 0's trainer state.

Atomicity: a checkpoint is filled under the sibling ``<name>.tmp``; ``publish`` writes the
marker into it (durably) and renames it to ``<name>``. A directory without the marker (a crash
mid-save) is never loaded; ``latest_checkpoint`` skips ``*.tmp`` and unmarked directories and
never deletes them (another job may be writing there). A tool that adds its own files to a
freshly saved checkpoint (conversion) does so inside ``amend``, which withholds the marker
until they are all written.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from nemo_anchored.atomic import TMP_SUFFIX, replace_directory

FORMAT_VERSION = 1
MARKER = "complete.json"
_PENDING_MARKER = MARKER + ".pending"


class CheckpointError(RuntimeError):
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
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no {MARKER} (the save did not finish)"
        )
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER}: {err}") from err
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version}, this code reads {FORMAT_VERSION}"
        )
    return marker


def latest_checkpoint(root) -> Optional[Path]:
    """The complete checkpoint directly under ``root`` with the highest global step (newest
    save time among equals), or None. ``*.tmp`` and unmarked directories are skipped, not
    deleted. A ``<name>.old`` left by a crash in the middle of re-saving ``<name>`` is complete
    and counts like any other checkpoint."""
    root = Path(root)
    if not root.is_dir():
        return None
    best, best_key = None, None
    for child in root.iterdir():
        if not child.is_dir() or child.name.endswith(TMP_SUFFIX):
            continue
        try:
            marker = read_marker(child)
        except CheckpointError:
            continue
        step = marker.get("global_step")
        key = (-1 if step is None else step, marker.get("saved_at", 0.0))
        if best_key is None or key > best_key:
            best, best_key = child, key
    return best
