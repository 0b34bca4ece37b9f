"""Optuna journal files that survive a writer killed mid-append.

Optuna's :class:`~optuna.storages.journal.JournalFileBackend` appends one JSON record per line. A
writer killed in the middle of an append (SIGKILL, node lost, a network file system that flushed only
part of a write) leaves an incomplete last line. Optuna skips it on read, but the next append lands
on the same line, which then decodes as garbage and the study can never be opened again.

:class:`TornTailJournalBackend` checks the tail under the journal's own lock, on open and before every
append: bytes after the last newline are a torn record (no writer holds the lock, so none is still
writing them). They are moved to a side file ``<journal>.torn-<UTC time>`` (kept, never dropped), the
journal is truncated to its last complete line, and one warning names the side file. Garbage in the
middle of the journal is another matter (the file was edited or damaged): it raises
:class:`~deepsports.errors.StorageError` naming the line and leaves the file untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from deepsports.errors import StorageError

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


def _last_newline_end(handle, size: int) -> int:
    """Offset just past the last ``\\n`` of the file (0 when it has none), reading backwards."""
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        handle.seek(start)
        chunk = handle.read(end - start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def check_records(path: str | os.PathLike) -> None:
    """Raise :class:`StorageError` naming the first complete line of ``path`` that is not a JSON record."""
    with open(path, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # the torn tail: set aside on open
            try:
                json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise StorageError(f"study journal {str(path)!r}: line {number} (byte {offset}) is not a journal "
                                   f"record ({exc}); the file was left as it is: restore it from a copy, or remove "
                                   f"that line by hand if it is not a record of the study") from exc
            offset += len(line)


def set_aside_torn_tail(path: str | os.PathLike) -> Path | None:
    """Move bytes after the last newline of ``path`` to ``<path>.torn-<time>`` and truncate; returns the side
    file, or None when the journal ends with a complete record. Call it holding the journal's lock."""
    path = Path(path)
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        return None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        keep = _last_newline_end(handle, size)
        if keep == size:
            return None
        handle.seek(keep)
        torn = handle.read(size - keep)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        side = path.with_name(f"{path.name}.torn-{stamp}-{os.getpid()}")
        with open(side, "xb") as out:  # kept before anything is cut from the journal
            out.write(torn)
            out.flush()
            os.fsync(out.fileno())
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("study journal %s ended in an incomplete record (a writer died mid-append): its %d byte(s) were "
                "moved to %s and the journal keeps its %d complete byte(s)", path, len(torn), side, keep)
    return side


class TornTailJournalBackend(JournalFileBackend):
    """A :class:`JournalFileBackend` that sets a torn last line aside (on open and before each append)."""

    def __init__(self, file_path: str) -> None:
        self._lock_for_repair = JournalFileSymlinkLock(file_path)
        super().__init__(file_path, lock_obj=self._lock_for_repair)
        self.torn_files: list[Path] = []
        check_records(file_path)
        self._with_lock(lambda: None)

    def _with_lock(self, then) -> Any:
        self._lock_for_repair.acquire()
        try:
            side = set_aside_torn_tail(self._file_path)
            if side is not None:
                self.torn_files.append(side)
            return then()
        finally:
            self._lock_for_repair.release()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(record, separators=(",", ":")) for record in logs) + "\n"

        def write() -> None:
            with open(self._file_path, "ab") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())

        self._with_lock(write)
