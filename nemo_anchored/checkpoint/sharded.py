"""Atomic, layout-independent training checkpoints on megatron-core's ``dist_checkpointing``.

Tensors are saved with the ``torch_dist`` backend as global tensors (megatron's sharded state
dicts describe where each rank's shard sits in them), so a checkpoint written at one TP x PP x DP
layout loads at another: weights always, optimizer state too (megatron's optimizers map their
state onto the same global tensors). RNG states and the trainer's per-rank state are restored
only at the layout they were saved at; elsewhere there is no meaningful mapping for them.

On-disk layout of one checkpoint directory ``<root>/<name>/``::

    complete.json       the completeness marker, written last (by global rank 0): format
                        version, the megatron-core version that wrote it, global step, save
                        time, layout, vocabulary size, which parts are present, a JSON copy of
                        rank 0's trainer state, and the size and CRC-32 of every other file
                        (each rank hashes the files it wrote)
    metadata.json       dist_checkpointing's backend record (torch_dist)
    common.pt           rank 0's plain entries: trainer state, lr scheduler state, the
                        optimizer's param groups (from megatron-core 0.19 on, inside the .distcp
                        files instead: see _check_readable)
    .metadata           torch.distributed.checkpoint's index of the global tensors / objects
    __<rank>_<n>.distcp the data, written in parallel by the ranks (each shard once), holding:
        <param key>                 the policy's weights, megatron's names, e.g.
                                    ``decoder.layers.mlp.linear_fc1.weight`` (layers stacked),
                                    ``embedding.word_embeddings.weight``
        snapshot.<param key>        the frozen snapshot's weights, when saved
        optimizer.<...>             the optimizer state, when saved
        rank_state/shard_<r>_<n>    per global rank r of n: its RNG states (python, numpy,
                                    torch CPU, torch CUDA, megatron's TP tracker) and trainer
                                    state

Atomicity (``nemo_anchored.checkpoint.format``): every rank writes into the sibling
``<name>.tmp``; after a barrier, rank 0 writes ``complete.json`` into it and renames it to
``<name>``. A directory without the marker (a crash mid-save) is never loaded. Re-saving to an
existing ``<name>`` moves the old one to ``<name>.old`` for the moment of the swap, then deletes
it. ``save_checkpoint`` deletes a leftover ``<name>.tmp`` of the same name before writing;
``scan_checkpoints`` only reads and never deletes (another job may be writing there), it skips
``*.tmp`` and reports unmarked directories.

Loading checks, before any tensor is read: the marker, the files against their recorded sizes
and checksums (spread over the ranks), and the checkpoint's tensor shapes against the model's;
each failure is a ``CheckpointError`` naming the file or tensor.

Every rank must see the same filesystem (as dist_checkpointing requires). ``save_checkpoint``,
``load_checkpoint`` and ``load_model_weights`` are collective: call them on every rank.
"""

import errno
import logging
import os
import queue
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import megatron.core
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from nemo_anchored.atomic import tmp_path
from nemo_anchored.checkpoint.format import (FORMAT_VERSION, MARKER, CheckpointError,
                                             check_serialisable, file_record, publish,
                                             read_marker, record_files, recorded_files,
                                             verify_files)
from nemo_anchored.checkpoint.shapes import index_mismatch
from nemo_anchored.parallel.megatron_compat import prepare_optimizer_for_load

logger = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snapshot."
_OPTIMIZER_PREFIX = "optimizer."
_RANK_STATE_KEY = "rank_state"
# torch.distributed.checkpoint reports every rank's failure as one CheckpointException, raised on
# all ranks alike; it derives from BaseException, not Exception.
_CHECKPOINT_FAILURES = (Exception, CheckpointException)
# dist_checkpointing's data files, __<global rank>_<n>.distcp, each written by that rank.
_DATA_FILE = re.compile(r"__(\d+)_\d+\.distcp")
# How a full disk reads once it has crossed a process boundary as text (the writer processes
# and the other ranks send their failures pickled, which drops the exception's cause).
_NO_SPACE_TEXT = f"[Errno {errno.ENOSPC}]"
# megatron-core 0.19 moved dist_checkpointing's common (non-tensor) state from common.pt into
# the torch_dist files (the object "common_state") and reads both; earlier releases, 0.16.1
# among them (the newest for Python 3.11), read only common.pt.
_COMMON_STATE_IN_TORCH_DIST = (0, 19)
_COMMON_FILE = "common.pt"


def _sharding_metadata() -> Dict[str, Any]:
    # The distributed optimizer's state is saved per parameter in the canonical (unsharded)
    # form, like the plain optimizer's, so it reshards across TP, PP and DP. megatron adds
    # process groups to this dict: a fresh one per call.
    return {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _layout() -> Dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
    }


# ------------------------------------------------------------------------------------ RNG


def _capture_rng() -> Dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # megatron's named streams (TP-local dropout, expert parallel ...), copied because the
        # tracker keeps updating its own.
        "tracker": {name: state.clone() for name, state in
                    tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: state.clone() for name, state in states["tracker"].items()}
    )
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _rank_state(data: Optional[Dict[str, Any]]) -> ShardedObject:
    """This rank's entry of the per-rank object (``data`` None: a slot to load into)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject(_RANK_STATE_KEY, data, (world,), (rank,), replica_id=0)


# --------------------------------------------------------------------------- marker / paths


def _vocab_size(model) -> Optional[int]:
    # build_gpt_model records the unpadded vocabulary: megatron loads embeddings of another
    # padded size (layouts pad differently) without complaint, so a vocabulary that does not
    # match would go unnoticed without this record.
    return getattr(model, "unpadded_vocab_size", None)


def _megatron_release(version: str) -> tuple:
    """(major, minor) of a megatron-core version string such as "0.19.2" or "0.20.0rc1"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _check_readable(path: Path, marker: Dict[str, Any]) -> None:
    """A checkpoint without common.pt has its common state where only megatron-core 0.19 and
    later look: say so, rather than fail inside an older megatron-core's loader."""
    reader = megatron.core.__version__
    if (path / _COMMON_FILE).exists() or _megatron_release(reader) >= _COMMON_STATE_IN_TORCH_DIST:
        return
    writer = marker.get("megatron_core")
    if writer is not None and _megatron_release(writer) < _COMMON_STATE_IN_TORCH_DIST:
        return  # a lost common.pt: verify_files or the loader names it
    origin = (f"megatron-core {writer} wrote it" if writer is not None else
              "written by megatron-core 0.19 or later, or its common.pt was lost")
    raise CheckpointError(
        f"checkpoint {path} has no {_COMMON_FILE} ({origin}): megatron-core 0.19 and later keep "
        f"the common state inside the torch_dist files, and this megatron-core {reader} reads "
        f"only {_COMMON_FILE}. Load it with megatron-core >= 0.19 (which needs Python >= 3.12)"
    )


def _check_fits(path: Path, marker: Dict[str, Any], model) -> None:
    saved, wanted = marker.get("vocab_size"), _vocab_size(model)
    if saved is not None and wanted is not None and saved != wanted:
        raise CheckpointError(
            f"checkpoint {path} has a vocabulary of {saved} tokens, the model {wanted}"
        )


def _global_step(state: Any) -> Optional[int]:
    """The value of the first ``global_step`` key in ``state``, searched through nested dicts
    (the trainer keeps it in ``state["position"]``)."""
    if not isinstance(state, dict):
        return None
    if "global_step" in state:
        return int(state["global_step"])
    for value in state.values():
        step = _global_step(value)
        if step is not None:
            return step
    return None


# ----------------------------------------------------------------------------- collectives


def _on_rank0(fn: Callable[[], None], what: str, path: Path) -> None:
    """Run ``fn`` on global rank 0; its failure (about checkpoint ``path``) is raised on every
    rank, so that no rank is left waiting in a collective that rank 0 never joins."""
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as err:  # reported to every rank below
            error = f"{what}: {_describe(err, path)}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(box[0])


def _raise_on_every_rank(error: Optional[str]) -> None:
    """Raise the first rank's ``error`` (None: it has none) on every rank (collective)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    first = next((e for e in gathered if e is not None), None)
    if first is not None:
        raise CheckpointError(first)


def _no_space(err: BaseException) -> bool:
    """Whether a full disk (ENOSPC) is ``err`` or anywhere among its causes, including every
    rank's failure inside a CheckpointException."""
    pending, seen = [err], set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or _NO_SPACE_TEXT in str(exc):
            return True
        if isinstance(exc, CheckpointException):
            pending.extend(failure for failure, _ in exc.failures.values())
        pending.extend((exc.__cause__, exc.__context__))
    return False


class _WriterErrors(logging.Handler):
    """The errors megatron-core's checkpoint writers log while a save runs. From 0.19 on, a
    writer's OSError reaches the raised exception only as its class: its errno, a full disk's
    among them, is in the log alone."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# Free space under which a failed save is put down to a full disk.
_NEARLY_FULL = 16 << 20


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _describe(err: BaseException, path: Path, logged: Sequence[str] = ()) -> str:
    """The gist of a failure about checkpoint ``path``: a full disk (in ``err`` or in the
    writers' ``logged`` errors) says so, on the folder it was written to; a
    CheckpointException's text is every rank's traceback, so only each rank's cause is kept."""
    if _no_space(err) or any(_NO_SPACE_TEXT in message for message in logged):
        return f"no space left on {path.parent}"
    free = _free_bytes(path.parent)
    if free is not None and free < _NEARLY_FULL:
        # torch's zip writer reports a full disk as "unexpected pos", its errno lost.
        return f"no space left on {path.parent} ({free >> 10} KiB free after the failed save)"
    if isinstance(err, CheckpointException):
        causes = sorted({f"{type(exc).__name__}: {exc}" for exc, _ in err.failures.values()})
        return "; ".join(causes)
    return f"{type(err).__name__}: {err}"


def _all_ranks_keys(keys) -> set:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return {key for rank_keys in gathered for key in rank_keys}


# -------------------------------------------------------------------------------- save


def _sharded_state_dict(model, optimizer, snapshot, *, is_loading: bool) -> Dict[str, Any]:
    state = {"model": model.sharded_state_dict(metadata=_sharding_metadata())}
    if snapshot is not None:
        # Its own global names, the same state-dict keys as the policy.
        state["snapshot"] = snapshot.sharded_state_dict(metadata=_sharding_metadata())
        add_prefix_for_sharding(state["snapshot"], SNAPSHOT_PREFIX)
    if optimizer is not None:
        if is_loading:
            prepare_optimizer_for_load(optimizer)
        # Maps the optimizer's state onto the model's global tensors (by parameter identity).
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata=_sharding_metadata()
        )
    return state


def _write_results_in_process() -> None:
    """megatron's torch_dist writer hands each save's write results to its finalisation through
    a module-level queue, by default a multiprocessing Manager's, so that an asynchronous save
    (a writer in another process) can use it: the first save starts the Manager's server, a
    spawned process of ~280 MB that a SIGKILLed run leaves behind as an orphan, with its resource
    tracker. Saves here are synchronous (the write and the finalisation run in this process,
    one after the other), so a plain in-process queue serves, and no process is started."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, snapshot=None,
                    state: Optional[Dict[str, Any]] = None) -> Path:
    """Save a checkpoint to ``path`` atomically (collective). Returns ``path``.

    ``model``: the policy (an unwrapped megatron ``GPTModel``, or anything with
    ``sharded_state_dict``); ``optimizer``: from ``get_megatron_optimizer``; ``scheduler``:
    megatron's ``OptimizerParamScheduler``; ``snapshot``: the frozen snapshot model; ``state``:
    the trainer's small plain values (JSON-serialisable on rank 0, which also goes into the
    marker). Each rank's own ``state`` and RNG states are saved too, captured on entry.
    """
    path = Path(path)
    tmp = tmp_path(path)
    state = dict(state or {})
    rank_state = _rank_state({"rng": _capture_rng(), "trainer_state": state})
    marker = {
        "format_version": FORMAT_VERSION,
        "megatron_core": megatron.core.__version__,  # the layout of its files (_check_readable)
        "global_step": _global_step(state),
        "layout": _layout(),
        "vocab_size": _vocab_size(model),
        "contents": [name for name, part in (("model", model), ("snapshot", snapshot),
                                              ("optimizer", optimizer),
                                              ("scheduler", scheduler)) if part is not None],
        "state": state,
    }

    def prepare():
        check_serialisable(marker)  # fail before any data is written
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir(parents=True)

    _on_rank0(prepare, f"cannot prepare checkpoint directory {tmp}", path)

    sharded = _sharded_state_dict(model, optimizer, snapshot, is_loading=False)
    sharded["trainer_state"] = state  # rank 0's copy, for loads at another layout
    sharded[_RANK_STATE_KEY] = rank_state
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    _write_results_in_process()
    # Each replicated shard (e.g. across data-parallel ranks) is written by one of its holders,
    # spread over the data-parallel group instead of all on DP rank 0.
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    writer_errors, writer_log = _WriterErrors(), logging.getLogger(dist_checkpointing.__name__)
    writer_log.addHandler(writer_errors)
    try:
        dist_checkpointing.save(
            sharded, str(tmp), sharded_strategy=strategy,
            # Ranks legitimately differ in their trainer state (e.g. last-stage metrics).
            preprocess_common_before_consistancy_check=lambda common: {
                k: v for k, v in common.items() if k != "trainer_state"
            },
        )
    except _CHECKPOINT_FAILURES as err:
        raise CheckpointError(f"saving checkpoint {path} failed: "
                              f"{_describe(err, path, writer_errors.messages)}") from err
    finally:
        writer_log.removeHandler(writer_errors)
    records = _file_records(tmp, path)  # collective: every rank's files are written

    def finish():
        marker["saved_at"] = time.time()
        record_files(marker, records)
        publish(tmp, path, marker)

    _on_rank0(finish, f"cannot finalise checkpoint {path}", path)
    return path


def _file_records(tmp: Path, path: Path) -> Dict[str, Dict[str, Any]]:
    """``file_record`` of every file saved into ``tmp`` for checkpoint ``path`` (collective).

    Each rank hashes the data files it wrote itself, and global rank 0 also the rest (the
    indexes, common.pt): the work is spread like the writing was, and each rank reads bytes it
    has just written, likely still in its page cache, where rank 0 alone would read the whole
    checkpoint back from a shared file system.
    """
    records, error = {}, None
    try:
        for file in tmp.iterdir():
            match = _DATA_FILE.fullmatch(file.name)
            writer = int(match.group(1)) if match else 0
            if writer == dist.get_rank():
                records[file.name] = file_record(file)
    except OSError as err:
        error = f"saving checkpoint {path} failed: {_describe(err, path)}"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (records, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    return {name: record for rank_records, _ in gathered for name, record in rank_records.items()}


# -------------------------------------------------------------------------------- load


def _verify(path: Path, marker: Dict[str, Any]) -> None:
    """``verify_files`` with the recorded files shared out over the ranks, so that together
    they read the checkpoint once; any rank's finding is raised on every rank (collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    try:
        verify_files(path, marker, recorded_files(marker)[rank::world])
    except CheckpointError as err:
        error = str(err)
    _raise_on_every_rank(error)


def _load(path: Path, sharded: Dict[str, Any], required_prefixes: Sequence[str]):
    """``dist_checkpointing.load`` with errors that name ``path`` and are raised on every rank.

    A requested tensor absent from the checkpoint, or a checkpoint tensor of the policy (or of
    another part in ``required_prefixes``) that nothing requested, means the architectures
    differ. The index is checked first (``shapes.index_mismatch``), so what fails while reading is a
    file (of a checkpoint saved without checksums, or damaged since ``_verify``).
    """
    # Pipeline stages hold different tensors: one stage's finding stops them all.
    _raise_on_every_rank(index_mismatch(path, sharded["model"]))
    try:
        loaded, missing, unexpected = dist_checkpointing.load(
            sharded, str(path), strict=StrictHandling.RETURN_ALL
        )
    except _CHECKPOINT_FAILURES as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: a file is missing, truncated or corrupt: "
            f"{_describe(err, path)}"
        ) from err
    unexpected = _all_ranks_keys(unexpected)  # per rank: make every rank raise alike
    other = (SNAPSHOT_PREFIX, _OPTIMIZER_PREFIX, _RANK_STATE_KEY)
    missing = {k for k in missing
               if k.startswith(tuple(required_prefixes)) or not k.startswith(other)}
    if unexpected or missing:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (architecture or parts differ): "
            f"not in the checkpoint: {sorted(unexpected)[:10]}; "
            f"in the checkpoint but not in the model: {sorted(missing)[:10]}"
        )
    return loaded


def _saved_lr_in_param_groups(optimizer, scheduler_state: Dict[str, Any]) -> None:
    """Gives the optimizer's param groups the max_lr and min_lr they had at save time, the
    scheduler's (megatron builds every group with them): megatron-core 0.19 pairs saved param
    groups with the current ones by such values, so at another optim.lr it would find none
    (0.16 pairs them by position). The load then restores the saved lr everywhere."""
    for group in optimizer.param_groups:
        for key in ("max_lr", "min_lr"):
            if key in group:
                group[key] = scheduler_state[key]


def load_checkpoint(path, *, model, optimizer=None, scheduler=None, snapshot=None
                    ) -> Dict[str, Any]:
    """Restore what ``save_checkpoint`` saved (collective); returns the trainer state.

    At the layout the checkpoint was saved at, each rank gets back its own trainer state and
    RNG states (restored last, so the random streams continue exactly). At another layout the
    weights and optimizer state are resharded, the RNG states are left as they are (a warning
    says so) and every rank gets rank 0's trainer state.
    """
    path = Path(path)
    marker = read_marker(path)
    missing = [key for key in ("contents", "layout") if key not in marker]
    if missing:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER}: no "
                              f"{' or '.join(map(repr, missing))}")
    _check_readable(path, marker)
    _check_fits(path, marker, model)
    for name, part in (("snapshot", snapshot), ("optimizer", optimizer),
                       ("scheduler", scheduler)):
        if part is not None and name not in marker["contents"]:
            raise CheckpointError(f"checkpoint {path} holds no {name} state to load")
    same_layout = marker["layout"] == _layout()
    _verify(path, marker)

    sharded = _sharded_state_dict(model, optimizer, snapshot, is_loading=True)
    if same_layout:
        sharded[_RANK_STATE_KEY] = _rank_state(None)
    loaded = _load(path, sharded, [SNAPSHOT_PREFIX] if snapshot is not None else [])

    model.load_state_dict(loaded["model"])
    if snapshot is not None:
        snapshot.load_state_dict(loaded["snapshot"])
    if optimizer is not None:
        if scheduler is not None:
            _saved_lr_in_param_groups(optimizer, loaded["opt_param_scheduler"])
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if not same_layout:
        if dist.get_rank() == 0:
            logger.warning("checkpoint %s was saved at layout %s, this run is %s: RNG states "
                           "are not restored", path, marker["layout"], _layout())
        return loaded["trainer_state"]
    rank_state = loaded[_RANK_STATE_KEY]
    _restore_rng(rank_state["rng"])
    return rank_state["trainer_state"]


def load_model_weights(path, model) -> None:
    """Load the policy weights of the checkpoint at ``path`` into ``model`` (collective), at
    any layout (vocabulary padding may differ: padded rows are zero). Other parts of the
    checkpoint are ignored. Call it before building an optimizer over ``model`` (a megatron
    optimizer with fp32 main weights would not see the new weights otherwise; for one that
    already exists call its ``reload_model_params()``)."""
    path = Path(path)
    marker = read_marker(path)
    _check_readable(path, marker)
    _check_fits(path, marker, model)
    _verify(path, marker)
    sharded = {"model": model.sharded_state_dict(metadata=_sharding_metadata())}
    loaded = _load(path, sharded, [])
    model.load_state_dict(loaded["model"])
