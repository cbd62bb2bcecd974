"""Process-group and model-parallel setup for megatron-core, the same code on CPU and GPU.

Under torchrun the rendezvous comes from its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Without torchrun a single process joins a world of size 1, so scripts
and tests run the same code path unlaunched. The backend is NCCL when CUDA is available and gloo
otherwise. ``init_process_group`` is where ``megatron_compat.install()`` is called, before
anything is built with megatron-core.

Two timeouts bound a rank's wait for its peers. While the world starts (the rendezvous, megatron's
groups) ranks wait up to the start-up timeout: a rank's imports, device and data set-up can lag
its peers' by minutes. Once a barrier has seen every rank, every group gets the collective
timeout instead: a rank that waits longer than that for a peer (a dead or hung node, whose
connections may stay open) gets an error instead of a hang, which ``peer_failure`` tells apart
from other errors. So a short collective timeout detects failures fast without failing slow starts.
"""

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from nemo_anchored.parallel import megatron_compat, vector_math


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the global, tensor-, pipeline- and data-parallel groups."""

    rank: int
    world_size: int
    device: torch.device
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int


def init_process_group(timeout_s: float = 1800.0) -> None:
    """Initialise torch.distributed from torchrun's environment, or as a world of one process."""
    megatron_compat.install()
    if dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ:
        if use_cuda:
            # NCCL binds a communicator to the current device: select it before the rendezvous.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        if use_cuda:
            torch.cuda.set_device(0)
        # An in-memory store needs no free port: nothing else ever joins a world of one.
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def init_model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    *,
    seed: Optional[int] = None,
    timeout_s: float = 1800.0,
    startup_timeout_s: Optional[float] = None,
) -> ParallelContext:
    """Initialise torch.distributed (if needed) and megatron's TP x PP x DP process groups.

    The data-parallel size is whatever remains of the world size. With ``seed`` the RNGs are
    seeded as well (see ``set_seed``). ``startup_timeout_s`` (default ``timeout_s``) bounds the
    wait for every rank to reach this point; ``timeout_s`` then bounds every collective's wait
    for a peer, in every group.
    """
    startup_s = timeout_s if startup_timeout_s is None else startup_timeout_s
    init_process_group(startup_s)
    vector_math.settle()
    from megatron.core import parallel_state

    world_size = dist.get_world_size()
    if world_size % (tensor_parallel_size * pipeline_parallel_size) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by TP={tensor_parallel_size} x "
            f"PP={pipeline_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        distributed_timeout_minutes=startup_s / 60,  # megatron: timedelta(minutes=...)
    )
    # A barrier on the default group (every rank has started), then the collective timeout on
    # it and on each of megatron's groups this rank belongs to.
    parallel_state.update_pg_timeout(timedelta(seconds=timeout_s))
    if seed is not None:
        set_seed(seed)
    return current_context()


def peer_failure(error: BaseException) -> Optional[str]:
    """What ``error`` says about a peer that died or stopped answering, in one line; None when
    it is no such failure of a collective.

    NCCL and the stores raise ``DistError``; gloo raises a plain RuntimeError whose text starts
    with its transport's source location (``[.../gloo/transport/tcp/pair.cc:537] Read error
    [10.0.0.2]:6056: Connection reset by peer. ...``), kept here without the location and the
    advice that follows.
    """
    text = str(error).strip()
    if not isinstance(error, dist.DistError) and not (
            isinstance(error, RuntimeError) and "gloo/transport/" in text):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    if first.startswith("[") and "] " in first:
        first = first.split("] ", 1)[1]
    return first.split(". ", 1)[0]


def current_context() -> ParallelContext:
    """The layout of this process, from megatron's parallel state (which must be initialised)."""
    from megatron.core import parallel_state as ps

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's tensor-parallel RNG tracker.

    Follows megatron's training convention: each pipeline stage offsets the seed by
    100 * pp_rank so that stages draw different dropout masks, while TP ranks share the default
    stream and the tracker gives each TP rank its own model-parallel stream.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def destroy_model_parallel() -> None:
    """Destroy megatron's process groups but keep torch.distributed (to re-initialise a layout).

    megatron's own ``destroy_model_parallel`` forgets most of its groups without destroying them;
    they stay alive, each gloo group with its own threads, so every re-initialisation in one
    process (the lab, the tests) would leak a few dozen threads.
    """
    from megatron.core import parallel_state

    # Several of megatron's names can hold one group: keyed by the group's name, each once.
    groups = {g.group_name: g for g in vars(parallel_state).values()
              if isinstance(g, dist.ProcessGroup) and g is not dist.group.WORLD}
    parallel_state.destroy_model_parallel()
    registered = dist.distributed_c10d._world.pg_map  # megatron destroys its gloo groups itself
    for group in groups.values():
        if group in registered:
            dist.destroy_process_group(group)


def shutdown() -> None:
    """Tear down megatron's groups and the default process group."""
    if dist.is_initialized():
        destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    *,
    seed: Optional[int] = None,
) -> Iterator[ParallelContext]:
    """Scope one TP x PP layout; the default process group outlives it (see ``shutdown``)."""
    context = init_model_parallel(tensor_parallel_size, pipeline_parallel_size, seed=seed)
    try:
        yield context
    finally:
        destroy_model_parallel()
