"""Processes that end with the process that started them.

A run killed with SIGKILL (the OOM killer, a scheduler's hard limit, ``kill -9``) runs no
cleanup, so what it started lives on unless the kernel ends it. megatron-core's checkpoint
writer forks a process per file at every save; a child forked just before the kill waits forever
for a queue item its parent's feeder thread never sent (seen: two such writers of 340 MB each,
still waiting 45 minutes after a test killed their run). The lab's worker processes would go on
training into run directories that the same command, run again, trains into as well. On Linux,
``PR_SET_PDEATHSIG`` has the kernel send a child SIGKILL when its parent dies; elsewhere nothing
is done.

The signal comes when the thread that forked the child ends, not only the process: the forks it
covers (megatron's synchronous save, the lab's workers) are made by the main thread.
"""
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_forking_pid = None  # the pid of the process forking now, for its child
_installed = False


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux); end at once if the
    parent, ``parent_pid``, has already ended (this process then has another parent)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def forked_children_die_with_this_process() -> None:
    """From now on every child this process forks (megatron's checkpoint writers) dies with it.
    For a command's process, which owns its lifetime: a library call would change its
    importer's children."""
    global _installed
    if not _installed:
        os.register_at_fork(before=_before_fork,
                            after_in_child=lambda: die_with_parent(_forking_pid))
        _installed = True
