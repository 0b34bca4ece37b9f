"""One training process per checkpoint directory.

Two processes resuming the same ``checkpoint_dir`` would both continue the same MLflow run and log
its epochs twice. :func:`checkpoint_dir_lock` holds an exclusive ``flock`` on ``<dir>/run.lock`` for
the run's lifetime; the file names the holder (pid, host, since when) for the error the second
process gets. The kernel drops the lock when its process dies, however it dies, so a lock left by a
dead process is taken over by the next run (the file's stale holder is only reported). On NFS,
``flock`` is forwarded to the server's lock manager (NFSv4, or lockd for v3): it works across nodes,
and a dead node's lock is released when its lease expires (about 90 s). A file system without
locks (some Lustre/BeeGFS mounts) gets a warning and no protection.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from deepsports.errors import CheckpointDirBusyError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
#: errno values of a file system that has no (working) flock: run unprotected instead of failing.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        record = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


@contextlib.contextmanager
def checkpoint_dir_lock(directory: str | os.PathLike | None) -> Iterator[Path | None]:
    """Hold ``<directory>/run.lock`` while the block runs; :class:`CheckpointDirBusyError` naming the holder
    when another live process holds it. ``None`` locks nothing."""
    if directory is None:
        yield None
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointDirBusyError(
                f"checkpoint_dir {str(directory)!r} is in use by {_describe(_holder(fd))} (lock {path}): two "
                f"processes would resume the same run and log its epochs twice; wait for it to end, stop it, or "
                f"use another checkpoint_dir") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            log.warning("cannot lock %s (%s): this file system has no file locks, so a second process on this "
                        "checkpoint_dir would not be stopped", path, exc.strerror)
        stale = _holder(fd)
        if stale and (stale.get("pid"), stale.get("host")) != (os.getpid(), socket.gethostname()):
            log.info("checkpoint_dir %s: taking over the lock left by %s (that process is gone)", directory,
                     _describe(stale))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        try:
            yield path
        finally:
            # Released: nobody holds it (a crash leaves the name, which the next run reports as taken over).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
