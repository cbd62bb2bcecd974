"""Run one function in a world of N local gloo processes, outside any launcher.

For CPU work that megatron-core does collectively even on one machine (conversion saves one
distributed checkpoint from N shard processes). Each process gets torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) with CUDA hidden, so
``parallel.distributed.init_process_group`` joins the world as under torchrun.
"""
import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch.multiprocessing as mp


class LocalWorldError(RuntimeError):
    """A process of the local world failed; the message holds what each failed rank reported."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environment(**values: Optional[str]) -> Iterator[None]:
    """Set (None: unset) environment variables for the processes started inside the block."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rank_main(rank: int, fn: Callable, args: Sequence, errors: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        fn(*args)
    except BaseException as err:  # reported to the parent, which names it in its error
        with open(errors, "a") as f:
            f.write(f"rank {rank}: {type(err).__name__}: {err}\n")
        raise


def run_local_world(fn: Callable, nprocs: int, args: Sequence = ()) -> None:
    """``fn(*args)`` in each of ``nprocs`` spawned processes forming one gloo world.

    ``fn`` must be importable (a module-level function): the processes are started with the
    ``spawn`` method, which re-imports the calling script, so call this from a script only under
    ``if __name__ == "__main__":``. Raises ``LocalWorldError`` when a process fails.
    """
    environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                   "WORLD_SIZE": str(nprocs), "CUDA_VISIBLE_DEVICES": "",
                   "OMP_NUM_THREADS": os.environ.get(
                       "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs))),
                   "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   # Under torchrun, this would send the processes to its store.
                   "TORCHELASTIC_USE_AGENT_STORE": None}
    with tempfile.TemporaryDirectory() as folder, _environment(**environment):
        errors = str(Path(folder) / "errors")
        try:
            mp.start_processes(_rank_main, nprocs=nprocs, start_method="spawn",
                               args=(fn, tuple(args), errors))
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            reported = Path(errors).read_text().strip() if Path(errors).exists() else ""
            raise LocalWorldError(reported or str(err)) from None
