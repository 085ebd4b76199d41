"""One training job per run folder: an advisory lock on ``out_dir/.lock``.

The lock is ``flock`` on an open file, so the kernel releases it when its holder exits in any way
(a crash, SIGKILL, a lost node's process): a lock left by a dead job is stale by construction and
the next job takes it, saying whose it was. The file records the holder (pid, host, command, start
time) so a refused job can say which job holds the folder.

``moe train`` takes the lock before it starts the launcher and tells its ranks
(:data:`HOLDER_ENV`), which then do not take it again; a rank started some other way (the
``deepspeed`` launcher directly, or ``python -m launch.train``) takes it on rank 0.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from moe.errors import UserError

LOCK_NAME = ".lock"
HOLDER_ENV = "SLIMMOE_OUT_DIR_LOCKED_BY"
"""Set by the process that holds the lock for the ranks it starts: the holder's pid."""


class JobLock:
    """Held from :meth:`acquire` until :meth:`release` or the end of the process."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self._file = None
        self.previous: Optional[dict] = None
        """The holder recorded by a job that ended without releasing the lock (a stale lock), if any."""

    def acquire(self) -> "JobLock":
        """Take the lock, or raise :class:`~moe.errors.UserError` naming the job that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(handle))
            handle.close()
            raise UserError(
                f"out_dir {str(self.path.parent)!r} is in use by another training job ({holder}); wait for it to "
                "finish or stop it, or give this run another out_dir"
            ) from None
        self.previous = _read_holder(handle)  # whatever a job that died holding it wrote
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": " ".join(sys.argv)[:500]}))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # a released lock records no holder
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_for_me() -> bool:
    """Whether a parent process took the lock for this rank (``moe train`` starting the launcher)."""
    holder = os.environ.get(HOLDER_ENV)
    if not holder:
        return False
    try:
        os.kill(int(holder), 0)
    except (ValueError, ProcessLookupError):
        return False  # an inherited variable of a holder that is gone: take the lock ourselves
    except PermissionError:
        return True
    return True


def _read_holder(handle) -> Optional[dict]:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}: {holder.get('command', '?')}"
