"""One live process per run directory: an exclusive ``flock`` on ``<directory>/run.lock``, held by rank 0.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a requeued or restarted
job finds it free, while a second live job for the same directory is refused at once instead of interleaving
its checkpoints with the first one's. On NFS, Linux takes ``flock`` as a lock on the server, so jobs on different
nodes see each other (a node that dies holding it releases it when its NFSv4 lease runs out, or under NFSv3 when it
boots again). The holder writes who it is into the file, for the refusal message. A filesystem that supports no
locks at all (Lustre mounted without ``flock``) gets a warning and no guard: refusing every run there would stop
more work than the lock protects.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from .logger import get_logger

log = get_logger(__name__)

LOCK_NAME = "run.lock"


def holder_description() -> str:
    """Who this process is, in the words a cluster user looks for: host, pid, Slurm job."""
    job = os.environ.get("SLURM_JOB_ID")
    return (f"host {socket.gethostname()}, pid {os.getpid()}{f', Slurm job {job}' if job else ''}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")


class DirectoryLock:
    """``acquire()`` raises ``ValueError`` naming the directory and the holder while another process holds it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> None:
        """Take the lock on the directory's current ``run.lock``, making the directory if needed. Called again while
        held (the directory was moved aside and made anew), it takes the new file before letting go of the old one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before the lock is ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = self.path.read_text().strip() or "a process that has not yet written its name"
                raise ValueError(f"{self.directory} is in use by another run ({holder}; lock file {self.path}): "
                                 f"wait for it to end or cancel it, or give this run another --output-dir") from exc
            log.warning("%s: cannot lock (%s): nothing stops a second job from writing to %s at the same time",
                        self.path, os.strerror(exc.errno), self.directory)
            return
        os.ftruncate(fd, 0)
        os.write(fd, (holder_description() + "\n").encode())
        self.release()
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
