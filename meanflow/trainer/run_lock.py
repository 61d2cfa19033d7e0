"""One trainer per run folder: an advisory lock on <train.out>/.lock, taken by rank 0 before it writes anything.

The lock is fcntl.flock on the open file, so the kernel drops it when the holder exits in any way (SIGKILL included):
a lock file left behind by a dead trainer never blocks the next one. The file's text (host, pid, start time) is only
there to name the holder to a trainer that finds the folder busy; it is rewritten by every new holder and opening it
never changes it. Where flock is not supported (some network file systems), the run warns and goes on unlocked.
"""

import errno
import fcntl
import logging
import os
import socket
import time

from meanflow.trainer.run_folder import LOCK, RunFolderError

log = logging.getLogger("meanflow.train")

# errors that mean "this file system cannot lock", not "someone holds the lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


class RunLock:
    """acquire() on rank 0 (through Dist.run_on_main, so that every rank stops when the folder is busy); release() at
    the end of the run, or the process's exit does it."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self.fd = None

    def acquire(self):
        """Hold the lock, or RunFolderError naming the trainer that holds it (at once: no waiting)."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's text stays as it is
        except OSError as e:
            raise RunFolderError(f"train.out: cannot create the lock file {self.path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"train.out: {self.run_dir} is in use by another trainer ({holder}); wait for it to end or use "
                    f"another --train.out (the lock is released when that process exits)"
                ) from None
            if e.errno not in _UNSUPPORTED:
                os.close(fd)
                raise RunFolderError(f"train.out: cannot lock {self.path}: {e}") from None
            log.warning("train.out: this file system does not support locking %s (%s): nothing stops a second "
                        "trainer from writing into %s at the same time", self.path, e, self.run_dir)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
        self.fd = fd

    def release(self):
        """Drop the lock (closing the file does); the file stays, and the next holder rewrites it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _holder(fd) -> str:
    """The holder's text; it may not have written it yet if it took the lock a moment ago."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "holder not recorded yet"
