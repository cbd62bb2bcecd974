"""Processes that end with the process that started them.

A run killed with SIGKILL (the OOM killer, a scheduler's hard limit, ``kill -9``) runs no
cleanup, so what it started lives on unless the kernel ends it. megatron-core's checkpoint
writer forks a process per file at every save; a child forked just before the kill waits forever
for a queue item its parent's feeder thread never sent (seen: two such writers of 340 MB each,
still waiting 45 minutes after a test killed their run). The lab's worker processes would go on
training into run directories that the same command, run again, trains into as well. On Linux,
``PR_SET_PDEATHSIG`` has the kernel send a child SIGKILL when its parent dies; elsewhere nothing
is done.

The signal comes when the thread that forked the child ends, not only the process, so only the
main thread's forks get it (megatron's synchronous save and the lab's workers are started from
the main thread): a child of a short-lived thread would be killed as that thread ends. A forked
child keeps its forking thread's identity, which tells the two apart. The child calls nothing
but prctl, looked up before any fork: a fork of a multi-threaded process may only call
async-signal-safe functions (no dlopen).
"""
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_prctl = None  # libc's prctl, looked up once, in the parent
_main_thread = None  # the main thread's identity, for the children that fork from it
_parent_pid = None  # the pid of the process forking now, for its child
_installed = False


def _libc_prctl():
    """libc's prctl, or None where it cannot be found (then nothing is asked for)."""
    global _prctl
    if _prctl is None:
        import ctypes

        try:
            _prctl = ctypes.CDLL(None).prctl
        except (OSError, AttributeError):
            return None
    return _prctl


def _ask_for_sigkill_and_check(parent_pid: int) -> None:
    # Best effort: where prctl fails the child merely lacks the protection.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent ended before the call above
        os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux); end at once if the
    parent, ``parent_pid``, has already ended (this process then has another parent)."""
    if sys.platform.startswith("linux") and _libc_prctl() is not None:
        _ask_for_sigkill_and_check(parent_pid)


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    if threading.get_ident() == _main_thread:
        _ask_for_sigkill_and_check(_parent_pid)


def forked_children_die_with_this_process() -> None:
    """From now on every child this process forks from its main thread (megatron's checkpoint
    writers) dies with it. For a command's process, which owns its lifetime: a library call
    would change its importer's children."""
    global _installed, _main_thread
    if sys.platform.startswith("linux") and not _installed and _libc_prctl() is not None:
        _main_thread = threading.main_thread().ident
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _installed = True
