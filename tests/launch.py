"""Starting the multi-process tests: torchrun subprocesses and gloo ranks spawned in-process.

Process start-up costs seconds on the 2-core CI machines, so each test module launches few
processes and checks a lot inside each.
"""
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list:
    """The pids of the current children of ``pid`` (those its main thread started)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state, after the command's name


def outlives(pids, grace_s: float = 10.0) -> list:
    """Those of ``pids`` still running after up to ``grace_s`` seconds."""
    deadline = time.monotonic() + grace_s
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # One intra-op thread per process: on 2 cores, OpenMP oversubscription by several ranks
    # makes these tiny models far slower.
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's connections on the loopback interface
    return env


class Script:
    """A Python script started alone (a world of one) or under torchrun, running while the
    caller goes on (two launches side by side keep both cores of the CI machines busy where one
    would leave a core idle); ``finish`` waits for it. Its output goes to temporary files: a
    pipe that nobody reads meanwhile could fill up and stall the script."""

    def __init__(self, script, *args, nproc: int = 1):
        launcher = [] if nproc == 1 else [
            "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={nproc}",
            "--master-addr", "127.0.0.1", f"--master-port={free_port()}"]
        self.script = script
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, *launcher, str(script), *map(str, args)],
                                        env=worker_env(), cwd=REPO, stdout=self.stdout,
                                        stderr=self.stderr)

    def finish(self, timeout: int = 900) -> subprocess.CompletedProcess:
        """Waits for the script (killed after `timeout` s, as subprocess.run does); fails the
        test on error."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        output = []
        for file in (self.stdout, self.stderr):
            file.seek(0)
            output.append(file.read())
            file.close()
        result = subprocess.CompletedProcess(self.process.args, self.process.returncode, *output)
        if result.returncode != 0:
            pytest.fail(f"{self.script} failed (exit {result.returncode}):\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
        return result

    def kill(self) -> None:
        """Stops the script if it still runs (after another launch's failure, say)."""
        self.process.kill()
        self.process.wait()


def run_script(script, *args, nproc: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs a Python script alone (a world of one) or under torchrun; fails the test on error."""
    return Script(script, *args, nproc=nproc).finish(timeout)


def torchrun_agent(argv, *, nproc: int, nnodes: int, port: int, log_dir: Path) -> subprocess.Popen:
    """One torchrun agent (one "node") running `python -m ARGV` on `nproc` processes, started in
    its own session; `nnodes` agents meet in a c10d rendezvous on 127.0.0.1:`port`, whose store
    the first one to start hosts. Each worker's stdout.log and stderr.log go under `log_dir`
    (see ``worker_logs``), the agent's own output to LOG_DIR/agent.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
               f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0",
               f"--log-dir={log_dir}", "--redirects=3", "-m", *map(str, argv)]
    with open(log_dir / "agent.log", "w") as agent_log:
        return subprocess.Popen(command, env=worker_env(), cwd=REPO, stdout=agent_log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def worker_logs(log_dir: Path) -> dict:
    """{path: text} of the worker logs a ``torchrun_agent`` wrote under `log_dir`."""
    return {path: path.read_text() for path in sorted(log_dir.rglob("std*.log"))}


class Worker(Script):
    """A worker script that writes named checks to WORKDIR/checks.json (``--out``).

    A check is {"topic", "name", "rank", "value", "limit", "ok"}: see ``assert_topic``."""

    def __init__(self, script, workdir: Path, *args, nproc: int):
        self.out = workdir / "checks.json"
        super().__init__(script, "--out", self.out, *args, nproc=nproc)

    def checks(self) -> list:
        """Waits for the worker; returns its checks."""
        self.finish(timeout=300)
        return json.loads(self.out.read_text())


def worker_checks(script, workdir: Path, *args, nproc: int) -> list:
    """Runs a ``Worker``; returns its checks."""
    return Worker(script, workdir, *args, nproc=nproc).checks()


class CheckLog:
    """Named checks a worker records (``items``); the tests assert them with ``assert_topic``."""

    def __init__(self, rank: int, default_limit: float | None = None):
        self.rank, self.default_limit, self.items = rank, default_limit, []

    def check(self, topic, name, value, limit=None):
        """A value (usually a max |difference|) that must be finite and <= limit."""
        value, limit = float(value), self.default_limit if limit is None else limit
        self.items.append({"topic": topic, "name": name, "rank": self.rank, "value": value,
                           "limit": limit, "ok": math.isfinite(value) and value <= limit})

    def expect(self, topic, name, condition):
        self.items.append({"topic": topic, "name": name, "rank": self.rank, "value": None,
                           "limit": None, "ok": bool(condition)})


def assert_topic(checks: list, topic: str, min_count: int) -> None:
    """Every check of `topic` passed, and at least `min_count` of them ran."""
    selected = [c for c in checks if c["topic"] == topic]
    assert len(selected) >= min_count, f"only {len(selected)} '{topic}' checks ran"
    failed = [
        f"rank {c['rank']}: {c['name']}" + ("" if c["value"] is None
                                            else f" = {c['value']:.3g} > {c['limit']:.3g}")
        for c in selected if not c["ok"]
    ]
    assert not failed, "\n".join(failed)


def _tp_rank_main(rank, world, port, failures, check):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Every rank creates every group, in the same order (torch.distributed requires it).
        pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
        everyone = dist.new_group(list(range(world)))
        check(rank, tp2=(pairs[rank // 2], rank % 2, 2), tp4=(everyone, rank, world))
        dist.barrier()
    except BaseException as error:  # report, then let the parent fail the test
        with open(failures, "a") as f:
            f.write(f"rank {rank}: {type(error).__name__}: {error}\n")
        raise
    finally:
        dist.destroy_process_group()


def spawn_tp_ranks(check, world: int = 4) -> None:
    """Runs check(rank, tp2=(group, index, 2), tp4=(group, index, 4)) on `world` gloo ranks:
    the ranks form world/2 TP = 2 groups and one group of all. `check` must be a module-level
    function (it is pickled by reference)."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as failures:
        try:
            mp.spawn(_tp_rank_main, args=(world, free_port(), failures.name, check),
                     nprocs=world, join=True)
        except Exception as error:
            pytest.fail(f"{failures.read() or error}")
