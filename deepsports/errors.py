"""Exception types of the library.

The library raises these; only :mod:`deepsports.cli` turns them into messages and exit codes.
"""

from __future__ import annotations

import os
import shutil


class DeepSportsError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code = 1


class ConfigError(DeepSportsError, ValueError):
    """A configuration value (file, key, override or flag) is invalid.

    ``keys`` names the config keys the error is about, so a caller that knows where each value came
    from (a file, the command line, a default) can say so.
    """

    exit_code = 2

    def __init__(self, *args: object, keys: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.keys = tuple(keys)


class DataError(DeepSportsError):
    """Annotations, splits, videos or the clip cache are missing or malformed."""

    exit_code = 3


class UnsafePickleError(DataError):
    """A pickle asked to import something the restricted unpickler does not allow."""


class CheckpointError(DeepSportsError):
    """A checkpoint cannot be read, is unsafe, or does not fit the model."""

    exit_code = 4


class CheckpointDirBusyError(CheckpointError):
    """Another live process holds the checkpoint directory's lock (it would resume the same run)."""

    exit_code = 8


class TrainingError(DeepSportsError):
    """Training could not continue (non-finite loss, worker crash, out of memory)."""

    exit_code = 5


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class SearchSpaceError(ConfigError):
    """A search-space file is invalid."""


class StorageError(DeepSportsError):
    """A tracking or study storage cannot be opened or does not hold what was asked for."""

    exit_code = 6


class JournalRecordError(StorageError):
    """A study journal holds a complete line that is not a journal record (the file was edited or damaged)."""

    exit_code = 6


class DiskFullError(StorageError):
    """A write failed because its file system is full (ENOSPC) or over quota (EDQUOT).

    Not a fault of the trial or the data: a study worker stops on it instead of failing trial after
    trial, and nothing half-written is left (the previous complete file stays in place).
    """

    exit_code = 6


class PreemptedError(DeepSportsError):
    """Training stopped early because the process was asked to (SIGUSR1/SIGTERM); a checkpoint was saved."""

    exit_code = 75  # EX_TEMPFAIL: the job should be run again


# --------------------------------------------------------------------------------------------
# Recognising a full file system under whatever wraps it
# --------------------------------------------------------------------------------------------

_FULL_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT (Linux numbering, as errno reports them)
#: How libraries word it when the OSError itself is gone: SQLite (SQLITE_FULL), the C library.
_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded")
#: A short write worded without an errno: numpy's fwrite check, torch's zip writer.
_SHORT_WRITE = (" requested and ", "unexpected pos ")
_NEARLY_FULL = 1 << 20


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to this user on the file system of ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def disk_full(exc: BaseException, path: str | os.PathLike, what: str, written: int | None = None
              ) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path``, its free space and ``what`` was being written when
    ``exc`` (or an exception it wraps: torch's RuntimeError "unexpected pos", MLflow's and SQLAlchemy's
    wrappers) says the file system is full or over quota; None for any other error."""
    full = any((isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(w in str(e).lower() for w in _FULL_WORDS)
               for e in _chain(exc))
    if not full and any(w in str(e) for e in _chain(exc) for w in _SHORT_WRITE):
        # numpy and torch report a short write without its errno: judge by the space left (call this
        # before removing the partial file, whose bytes would otherwise count as free).
        free = free_bytes(path)
        full = free is not None and free < _NEARLY_FULL
    if not full:
        return None
    named = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    target = str(named or path)
    done = f" after {_size(written)} of it were written" if written else ""
    return DiskFullError(f"no space left writing {what} to {target}{done}: {_size(free_bytes(target))} free on its "
                         f"file system; free some space (or point it elsewhere) and run the same command again: "
                         f"nothing half-written was kept and the previous complete files are intact")
