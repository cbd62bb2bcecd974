"""Atomic file and directory writes: a reader sees the old content or the new, never half.

Everything the project writes that a later command reads (checkpoints, conversions, data sets,
results) goes through here. The pattern is always the same: write a sibling ``NAME.tmp``, make
its bytes durable (fsync), rename it over ``NAME`` (atomic within one file system), and fsync the
parent directory so that the rename itself survives a crash.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"


def tmp_path(path: Path) -> Path:
    """The sibling a write of ``path`` is staged in."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (parents created). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "w", encoding=encoding) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def replace_directory(staged: Path, path: Path) -> None:
    """Rename the finished directory ``staged`` to ``path``, replacing what is there.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is moved to
    ``path.old`` for the moment of the swap and deleted after it: a crash in between leaves
    ``path.old``, complete, which readers that scan a folder may still use.
    """
    old = path.with_name(path.name + _OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staged.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(path) -> Iterator[Path]:
    """Build the directory ``path`` atomically: the block fills the yielded empty sibling
    ``path.tmp`` (a leftover of a crashed attempt is deleted first), which replaces ``path``
    when the block ends without an error and is removed when it raises."""
    path = Path(path)
    staged = tmp_path(path)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_directory(staged, path)


def copy_tree(source, path) -> Path:
    """Copy the directory ``source`` to ``path`` atomically. Returns ``path``."""
    with staged_directory(path) as staged:
        shutil.copytree(source, staged, dirs_exist_ok=True)
    return Path(path)
