"""One run per run directory: an exclusive lock on ``RUN_DIR/.lock``.

Two runs writing one directory (a command started twice, or twice at the same instant) would
overwrite each other's checkpoints and interleave their metrics. The first takes the lock; the
second stops with ``RunDirectoryLocked``, naming the holder's host and pid.

The lock is a POSIX record lock (``fcntl.lockf``) on the lock file, which the operating system
drops when the holding process ends in any way (SIGKILL, a crash, a lost node), so no crashed
run leaves the directory blocked. Not ``flock``: a flock belongs to the open file, which the
processes megatron forks to write a checkpoint inherit, and one of them orphaned by a kill in
the middle of a save kept the directory locked (seen); record locks are not inherited by fork.
They belong to the process, so one process cannot hold two ``RunLock`` of one directory against
itself (the lab runs its trainings one after another).

The file also holds a JSON record of the holder (host, pid, start time) for the message; a
clean release empties it, so a record found by the next run that takes the lock is a
stale one: its holder ended without releasing (``RunLock.acquire`` returns a note saying so).

On a network file system the lock is only as good as the server's lock manager (NFS: record
locks need a working lockd; a client that dies may hold its lock until the server notices).
The pid of a holder on another host cannot be checked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from nemo_anchored.errors import UserError

LOCK_NAME = ".lock"
# A second run that arrives while the first has the lock but not yet its record written waits
# this long for the record, so that its message can name the holder.
_RECORD_WAIT_S = 2.0


class RunDirectoryLocked(RuntimeError, UserError):
    """Another live run holds the run directory."""


class RunLock:
    """The exclusive lock of one run directory, held from ``acquire`` to ``release``."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock, or raise ``RunDirectoryLocked``. Returns a note naming the previous
        holder when it had ended without releasing the lock (killed or crashed), else None."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryLocked(self._held_message()) from None
        previous = _read_record(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous is None:
            return None
        return (f"the previous run in {self.run_dir} ({_describe(previous)}) ended without "
                "releasing its lock (killed or crashed); this run takes over")

    def release(self) -> None:
        """Empty the record (a clean end) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # drops the lock

    def _held_message(self) -> str:
        holder = self._wait_for_live_record()
        who = _describe(holder) if holder else "a process that has not written its record yet"
        return (f"run directory {self.run_dir} is in use by another run ({who}; lock file "
                f"{self.path}): wait for it to finish, stop it, or give this run another "
                "logging.dir")

    def _wait_for_live_record(self) -> Optional[dict]:
        """The holder's record; a holder that took the lock a moment ago may not have replaced
        its predecessor's (or any) record yet, so an absent record or one naming a dead local
        process is read again for a short while."""
        deadline = time.monotonic() + _RECORD_WAIT_S
        while True:
            try:
                with open(self.path, "rb") as f:
                    record = _parse_record(f.read())
            except OSError:
                record = None
            if (record is not None and _alive(record)) or time.monotonic() > deadline:
                return record
            time.sleep(0.05)


def _read_record(fd: int) -> Optional[dict]:
    size = os.fstat(fd).st_size
    return _parse_record(os.pread(fd, size, 0)) if size else None


def _parse_record(data: bytes) -> Optional[dict]:
    try:
        record = json.loads(data)
    except ValueError:  # empty (released, or not written yet) or torn
        return None
    return record if isinstance(record, dict) else None


def _alive(record: dict) -> bool:
    """Whether the recorded process runs; a process on another host counts as alive (its pid
    means nothing here)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(record: dict) -> str:
    started = record.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) \
        if isinstance(started, (int, float)) else ""
    state = "" if _alive(record) else ", no longer running"
    return f"host {record.get('host')}, pid {record.get('pid')}{since}{state}"
