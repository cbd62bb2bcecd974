"""A run on a cluster stops and resumes cleanly (docs/design/cluster.md), on CPU with gloo: two
torchrun agents on this machine are two nodes of two processes each (TP = 2 x DP = 2, anchored
snapshot mode) and must match one agent running four processes bitwise, through a preemption
(SIGUSR1 to one rank), a node that stops answering, and the resumes after both.
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import REPO, children, free_port, torchrun_agent, worker_logs

DATA = REPO / "recipes/data/tiny_sft.jsonl"
TIMEOUT_S = 15  # parallelism.collective_timeout_s: above any wait after start-up, busy 2-core box
STEPS = 8  # 2 outer iterations x 4 inner steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A trained SFT reference (stage 1, two steps), run in this process: no start-up cost."""
    from nemo_anchored.cli.main import main

    run_dir = tmp_path_factory.mktemp("sft")
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--config", str(REPO / "recipes/tiny_cpu.yaml"), "trainer.max_steps=2",
              f"data.train_path={DATA}",
              f"logging.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false"])
    assert exit_info.value.code == 0
    return run_dir


def anchor_command(reference: Path, run_dir: Path) -> list:
    return ["nemo_anchored", "anchor", "--config", REPO / "recipes/tiny_cpu.yaml",
            f"data.train_path={DATA}",
            f"model.base_checkpoint={reference / 'base'}",
            f"model.reference_checkpoint={reference / 'final'}",
            "parallelism.tensor_model_parallel_size=2", "trainer.micro_batch_size=2",
            "anchor.mode=snapshot", "anchor.outer_iterations=2", "anchor.inner_steps=4",
            "model.hidden_dropout=0.1", f"parallelism.collective_timeout_s={TIMEOUT_S}",
            "logging.progress=false", "logging.tensorboard=false", f"logging.dir={run_dir}"]


def records(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in records(run_dir) if "event" not in r]


def wait_for_step(run_dir: Path, step: int, agents) -> None:
    deadline = time.time() + 300
    while len(losses(run_dir)) < step:
        assert all(a.poll() is None for a in agents), "the run ended before the signal"
        assert time.time() < deadline, f"step {step} never came"
        time.sleep(0.05)


def node_processes(agent: subprocess.Popen) -> list:
    """The agent's pid and its workers' (torchrun starts each in a session of its own)."""
    return [agent.pid, *children(agent.pid)]


def two_nodes(command, log_dir: Path):
    port = free_port()
    host = torchrun_agent(command, nproc=2, nnodes=2, port=port, log_dir=log_dir / "node0")
    # node0 hosts the rendezvous store (it binds the port first): the node that survives below.
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert host.poll() is None and time.time() < deadline, "node0 did not start"
            time.sleep(0.1)
    other = torchrun_agent(command, nproc=2, nnodes=2, port=port, log_dir=log_dir / "node1")
    return host, other


def text(log_dir: Path) -> str:
    return "\n".join(worker_logs(log_dir).values())


@pytest.mark.parametrize("key", ["collective_timeout_s", "startup_timeout_s"])
def test_timeouts_must_be_positive(key):
    from nemo_anchored.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"parallelism.{key}: must be > 0"):
        load_config(REPO / "recipes/tiny_cpu.yaml",
                    [f"data.train_path={DATA}", f"parallelism.{key}=0"])


LATE_S, SHORT_S = 6.0, 2.0  # rank 1 starts LATE_S after rank 0; collective timeout SHORT_S


def _late_start_rank(out: str) -> None:
    """Rank 1 joins LATE_S late, longer than the collective timeout but within the start-up
    timeout; then it stops answering while rank 0 waits in a barrier."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_anchored.parallel.distributed import init_model_parallel, peer_failure, shutdown

    rank = int(os.environ["RANK"])
    if rank == 1:
        time.sleep(LATE_S)
    init_model_parallel(1, 1, timeout_s=SHORT_S, startup_timeout_s=120)
    groups = [dist.group.WORLD if g is None else g
              for g in parallel_state._global_process_group_list]
    timeouts = {g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for g in groups}
    if rank == 1:
        time.sleep(SHORT_S + 6)  # alive but silent: rank 0's barrier must time out meanwhile
        return
    start = time.monotonic()
    try:
        dist.barrier()
        failure = None
    except RuntimeError as error:
        failure = peer_failure(error)
    Path(out).write_text(json.dumps({"groups": len(groups), "timeouts": sorted(timeouts),
                                     "waited_s": time.monotonic() - start, "failure": failure}))
    shutdown()


@pytest.mark.slow  # two spawned ranks, one of them started late on purpose
def test_start_up_waits_longer_than_collectives(tmp_path):
    """A rank that starts later than the collective timeout still joins (start-up has its own
    timeout); afterwards every group of the rank uses the collective timeout."""
    from nemo_anchored.parallel.local_world import run_local_world

    out = tmp_path / "rank0.json"
    run_local_world(_late_start_rank, 2, args=(str(out),))
    seen = json.loads(out.read_text())
    assert seen["groups"] > 1  # the default group and megatron's
    assert seen["timeouts"] == [SHORT_S]
    assert seen["failure"] is not None, "the barrier with a silent peer did not fail"
    assert seen["waited_s"] < LATE_S, seen  # the collective timeout, not the start-up one


@pytest.mark.slow  # four torchrun launches and training runs
def test_two_nodes_match_one_through_preemption_and_node_failure(tmp_path, reference):
    whole, split, logs = tmp_path / "whole", tmp_path / "split", tmp_path / "logs"

    # 1) Preemption: SIGUSR1 to one worker of the second node once step 1 is logged; every rank
    # agrees on the next step boundary, saves there and exits 0.
    command = anchor_command(reference, split)
    host, other = two_nodes(command, logs / "preempt")
    wait_for_step(split, 1, [host, other])
    os.kill(node_processes(other)[1], signal.SIGUSR1)
    assert [host.wait(timeout=300), other.wait(timeout=300)] == [0, 0], \
        text(logs / "preempt")[-4000:]
    said = [line for line in text(logs / "preempt").splitlines() if "preempted by" in line]
    assert len(said) == 1 and "preempted by SIGUSR1 after step" in said[0], said
    step = len(losses(split))
    assert 1 <= step < STEPS
    saved = split / "checkpoints" / f"step_{step:07d}"
    assert f"checkpoint {saved} saved; the same command resumes from {saved}" in said[0]
    assert (saved / "complete.json").exists()
    preempted = losses(split)  # compared with the uninterrupted run's once that has run

    # 2) The same command resumes; the second node then stops answering (SIGSTOP: its
    # connections stay open, as when a machine hangs or drops off the network). The first
    # stops on its own within the collective timeout, saying what happened, before the second
    # node is killed outright.
    host, other = two_nodes(command, logs / "fail")
    wait_for_step(split, step + 1, [host, other])
    stopped = node_processes(other)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    # The uninterrupted run (one node of four processes), which every loss is compared with,
    # uses the cores meanwhile: the surviving node only waits for its collective timeout.
    one = torchrun_agent(anchor_command(reference, whole), nproc=4, nnodes=1, port=free_port(),
                         log_dir=logs / "whole")
    try:
        status = host.wait(timeout=TIMEOUT_S + 90)  # a hang would last until this fails
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
        other.wait()
    print(f"surviving node stopped {time.monotonic() - start:.1f} s after the other hung")
    assert status != 0
    survivor = worker_logs(logs / "fail" / "node0")
    errors = [t for path, t in survivor.items() if path.name == "stderr.log"]
    assert any("lost a peer rank" in t for t in errors), errors
    for t in errors:  # one line each, no traceback
        assert "Traceback" not in t, t
        assert [line for line in t.splitlines() if "nemo-anchored anchor:" in line] == \
            [line for line in t.splitlines() if "lost a peer rank" in line]
    assert f"collective_timeout_s={TIMEOUT_S} s" in "".join(errors)
    assert "the same command resumes from the newest complete checkpoint" in "".join(errors)
    assert one.wait(timeout=600) == 0, text(logs / "whole")[-4000:]
    assert len(losses(whole)) == STEPS
    assert preempted == losses(whole)[:step]

    # 3) Both nodes restarted with the same command finish the run: every step's loss is the
    # uninterrupted run's, bitwise.
    host, other = two_nodes(command, logs / "resume")
    assert [host.wait(timeout=600), other.wait(timeout=600)] == [0, 0], \
        text(logs / "resume")[-4000:]
    assert "resumed from" in text(logs / "resume")
    assert losses(split) == losses(whole)
