"""The tokenized-data cache: a JSONL file is tokenized once per (file content, tokenizer,
settings) into memory-mapped arrays that every rank of a job, and every later job, reads.

Layout (docs/design/data_cache.md): ``CACHE_DIR/<file name>.<key>/`` holds ``ids.npy``,
``assistant.npy`` and ``offsets.npy`` (an ``SFTDataset``'s arrays) and ``manifest.json``: what
the key was computed from, the size and CRC-32 of each array file, and the ``DataReport``, so
that a warm start reports exactly what the cold one did. The key is a hash of the data file's
bytes, the tokenizer's identity (a Hugging Face folder's file contents and library versions),
seq_length, on_error, overlong, and the source of the modules that turn lines into tokens
(this one, sft.py, tokenizer.py): a change to any of them is a different directory, so a cache
is never read by code that would have tokenized differently. data.packing is not in the key:
packing is a layout of the loaded examples, computed after loading (sft.py).

A directory is built under a sibling ``<name>.tmp.<host>.<pid>``, manifest last, and renamed into
place, so a crashed build is never mistaken for a cache; of two jobs building the same key at
once, the first to rename wins and the other discards its own complete copy. A cache
whose files do not match the manifest (truncated, corrupted, manifest missing or unreadable) is
rebuilt with a warning naming it.

Under torch.distributed, global rank 0 reads or builds the cache while the other ranks wait;
then they map the same files. Ranks on other nodes therefore need the cache directory on a file
system they share with rank 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch.distributed as dist

from nemo_anchored.atomic import fsync_dir, replace_directory, write_text
from nemo_anchored.data import sft, tokenizer as tokenizer_module
from nemo_anchored.data.sft import DataError, DataReport, SFTDataset, load_sft_dataset
from nemo_anchored.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from nemo_anchored.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_ARRAYS = ("ids", "assistant", "offsets")  # SFTDataset's fields, one .npy file each
# Files of a tokenizer folder that cannot change its tokens: model weights, which a folder
# holding a whole Hugging Face model also contains and which are too large to hash at every start.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
# The waiting ranks' limit: tokenizing a large file takes longer than the default process
# group's timeout (minutes), and a dead rank 0 ends the job through torchrun anyway.
_BUILD_WAIT = timedelta(hours=24)
_READ_CHUNK = 16 << 20
# The code that turns lines into cached arrays, as imported (a source edited since does not
# run in this process).
_CODE_SHA256 = hashlib.sha256(b"".join(
    Path(source).read_bytes() for source in (sft.__file__, tokenizer_module.__file__, __file__)
)).hexdigest()


def cached_sft_dataset(path: Union[str, Path], tokenizer: Tokenizer, seq_length: int, *,
                       on_error: str = "raise", overlong: str = "truncate",
                       cache_dir: Optional[Union[str, Path]]) -> SFTDataset:
    """``load_sft_dataset(path, tokenizer, seq_length, on_error, overlong)``, read from the cache
    under ``cache_dir`` (data.cache_dir; ``~`` expanded), which is built first when missing,
    stale or unusable. ``cache_dir=None``: no cache, every rank tokenizes the file itself.

    Under torch.distributed every rank must call it (it is a collective): global rank 0 reads
    or builds, the others wait and then map the files it names. An error on rank 0 (bad data,
    an unwritable cache directory) is raised on every rank.
    """
    if cache_dir is None:
        return load_sft_dataset(path, tokenizer, seq_length, on_error, overlong)
    settings = {"seq_length": seq_length, "on_error": on_error, "overlong": overlong}
    cache_dir = Path(cache_dir).expanduser()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _read_or_build(Path(path), tokenizer, settings, cache_dir)[1]
    # A group of its own, so the wait is not cut short by the default group's timeout.
    group = dist.new_group(backend="gloo", timeout=_BUILD_WAIT)
    try:
        if dist.get_rank() == 0:
            try:
                directory, dataset = _read_or_build(Path(path), tokenizer, settings, cache_dir)
            except Exception as error:
                _from_rank_0(group, {"error": f"{error}", "type": type(error).__name__,
                                     "user": isinstance(error, UserError)})
                raise
            _from_rank_0(group, {"directory": str(directory)})
            return dataset
        outcome = _from_rank_0(group, None)
    finally:
        dist.destroy_process_group(group)
    if "error" in outcome:
        if outcome["user"]:
            raise DataError(outcome["error"])
        raise RuntimeError(f"rank 0 failed preparing the data: {outcome['type']}: "
                           f"{outcome['error']}")
    directory = Path(outcome["directory"])
    try:
        return _open(directory, Path(path), note="read")
    except _Unusable as reason:
        raise DataError(
            f"data.cache_dir={cache_dir}: rank {dist.get_rank()} cannot read the cache rank 0 "
            f"prepared at {directory} ({reason}): the cache directory must be on a file system "
            f"that every node shares (or data.cache_dir=null: every rank tokenizes the data "
            f"itself)") from None


def cache_key(path: Path, tokenizer: Tokenizer, settings: Dict[str, Any]) -> Dict[str, Any]:
    """What the cached arrays depend on, and the key (``"key"``) hashed from it."""
    inputs = {"data_sha256": _file_digest(path), "tokenizer": tokenizer_identity(tokenizer),
              "code_sha256": _CODE_SHA256, **settings}
    text = json.dumps(inputs, sort_keys=True)
    return {**inputs, "key": hashlib.sha256(text.encode()).hexdigest()[:32]}


def tokenizer_identity(tokenizer: Tokenizer) -> Dict[str, Any]:
    """Everything that decides the tokenizer's ids, independent of where its files are (a copy
    of a tokenizer folder shares the cache of the original)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"class": "ByteTokenizer"}  # all in code, which the key hashes
    if isinstance(tokenizer, HFTokenizer):
        import jinja2
        import tokenizers
        import transformers

        folder = Path(tokenizer.name)
        files = {str(file.relative_to(folder)): _file_digest(file)
                 for file in sorted(folder.rglob("*"))
                 if file.is_file() and file.suffix not in _WEIGHT_SUFFIXES}
        return {"class": "HFTokenizer", "files": files,
                "libraries": {"transformers": transformers.__version__,
                              "tokenizers": tokenizers.__version__,
                              "jinja2": jinja2.__version__}}
    raise TypeError(f"the tokenized-data cache cannot identify tokenizer {tokenizer!r}: add its "
                    f"type to tokenizer_identity")


class _Unusable(Exception):
    """A cache directory that cannot be used as it is; the message says why."""


def _read_or_build(path: Path, tokenizer: Tokenizer, settings: Dict[str, Any],
                   cache_dir: Path) -> Tuple[Path, SFTDataset]:
    """The cache directory of (path, tokenizer, settings) and its data set, read or built."""
    inputs = cache_key(path, tokenizer, settings)
    directory = cache_dir / f"{path.name}.{inputs['key']}"
    if directory.exists():
        try:
            return directory, _open(directory, path, inputs=inputs, note="read")
        except _Unusable as reason:
            logger.warning("data cache %s is unusable (%s): rebuilding it", directory, reason)
    start = time.perf_counter()
    dataset = load_sft_dataset(path, tokenizer, settings["seq_length"], settings["on_error"],
                               settings["overlong"])
    try:
        _write(dataset, inputs, directory)
    except OSError as error:
        raise DataError(f"data.cache_dir={cache_dir}: cannot write the tokenized-data cache "
                        f"({error}); set data.cache_dir to a writable directory (on a file "
                        f"system every node shares), or null to tokenize in memory") from error
    return directory, _open(directory, path, note=f"built in "
                                                  f"{time.perf_counter() - start:.1f} s")


def _write(dataset: SFTDataset, inputs: Dict[str, Any], directory: Path) -> None:
    """Publish ``dataset``'s arrays and manifest as ``directory``."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Unique per builder, so that concurrent jobs never write into one staging directory; a
    # leftover of this name is a crashed build of a process that had this pid on this host.
    staged = directory.with_name(f"{directory.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        files = {}
        for name in _ARRAYS:
            file = staged / f"{name}.npy"
            with open(file, "wb") as stream:
                np.save(stream, getattr(dataset, name))
                stream.flush()
                os.fsync(stream.fileno())
            files[name] = {"bytes": file.stat().st_size, "crc32": _crc32(file)}
        report = dataclasses.asdict(dataset.report)
        for own in ("path", "cache"):  # this run's, not the cache's
            del report[own]
        manifest = {"inputs": inputs, "files": files, "pad_id": dataset.pad_id,
                    "report": report}
        write_text(staged / MANIFEST, json.dumps(manifest, indent=1))
        try:
            os.rename(staged, directory)
        except OSError:  # it exists: published by another job meanwhile, or being replaced
            try:
                _check(directory, inputs)  # the other job's copy: as good as this one
            except _Unusable:
                replace_directory(staged, directory)
        fsync_dir(directory.parent)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _check(directory: Path, inputs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest of ``directory`` when every file has the size it records; with the
    ``inputs`` the cache must have been built from, also when the manifest records those and
    every file matches its CRC-32 (one read of the whole cache: what rank 0 does before any
    rank uses it). Raises _Unusable saying what does not match."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise _Unusable(f"no {MANIFEST}") from None
    except (OSError, ValueError) as error:
        raise _Unusable(f"unreadable {MANIFEST}: {error}") from None
    try:
        if inputs is not None and manifest["inputs"] != inputs:
            raise _Unusable(f"{MANIFEST} was written for other inputs")
        for name in _ARRAYS:
            file, record = directory / f"{name}.npy", manifest["files"][name]
            size = file.stat().st_size if file.exists() else None
            if size != record["bytes"]:
                raise _Unusable(f"{file.name} has {size} bytes, {MANIFEST} says "
                                f"{record['bytes']}")
            if inputs is not None and _crc32(file) != record["crc32"]:
                raise _Unusable(f"{file.name} does not match its CRC-32")
    except (KeyError, TypeError) as error:
        raise _Unusable(f"{MANIFEST} lacks {error}") from None
    return manifest


def _open(directory: Path, path: Path, *, note: str,
          inputs: Optional[Dict[str, Any]] = None) -> SFTDataset:
    """The cached data set in ``directory`` (checked by ``_check(directory, inputs)``),
    memory-mapped, its report naming ``path`` and ``note``."""
    manifest = _check(directory, inputs)
    try:
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        report = DataReport(path=str(path), **manifest["report"],
                            cache=f"{directory} ({note})")
        report.skipped = [tuple(item) for item in report.skipped]
        dataset = SFTDataset(**arrays, seq_length=manifest["inputs"]["seq_length"],
                             pad_id=manifest["pad_id"], report=report)
    except (KeyError, TypeError, ValueError) as error:
        raise _Unusable(f"{MANIFEST} does not describe the arrays: {error!r}") from None
    offsets = dataset.offsets
    if (len(dataset) != report.examples_kept or offsets[0] != 0
            or offsets[-1] != len(dataset.ids) or len(dataset.assistant) != len(dataset.ids)):
        raise _Unusable("the arrays do not fit together")
    return dataset


def _from_rank_0(group, outcome: Optional[dict]) -> dict:
    """Rank 0's ``outcome``, on every rank; the other ranks wait here until rank 0 sends it."""
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _file_digest(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc
