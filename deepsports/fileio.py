"""Files on disk: the one atomic writer and the one safe reader of torch files (checkpoints, weights).

:func:`atomic_write` writes to a temporary file in the target's directory, fsyncs it, renames it over
the target with :func:`os.replace` and fsyncs the directory: a reader (or a process killed mid-write)
sees the old file or the new one, never half of one, and a power loss does not undo the rename.

:func:`read_torch_file` is ``torch.load(weights_only=True)`` on the CPU: a pickle that would import
and run code is refused unexecuted, and every way a file can be unreadable is a
:class:`~deepsports.errors.CheckpointError` naming it. Standard library only at import time (torch is
imported when a file is read), so every room may use this module.
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from deepsports.errors import CheckpointError, disk_full

#: What a damaged file raises in whichever layer meets the damage first (zip directory, pickle
#: opcodes, storage records); the types a fuzz of truncations and byte flips produced (a cut zip
#: raises OSError "Invalid argument" too, so an OSError is reported with its text as damage).
_CORRUPT_ERRORS = (RuntimeError, EOFError, ValueError, IndexError, KeyError, AssertionError, struct.error,
                   zipfile.BadZipFile, OSError)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (skipped where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, temp_prefix: str | None = None,
                 temp_suffix: str = ".tmp", what: str | None = None) -> Path:
    """Call ``write(binary file)`` on a temp file next to ``path``, fsync it, rename it over ``path``.

    The temp file is ``<temp_prefix><random><temp_suffix>`` (default ``.<name>.<random>.tmp``), so
    that the owner of a directory can recognise and remove those of a writer that was killed.
    Also on KeyboardInterrupt no temp file is left behind. A full file system or quota (also when
    torch or numpy word it as a short write) raises :class:`~deepsports.errors.DiskFullError` naming
    ``what`` (default: the file name), the path and the free space; ``path`` is then untouched.
    """
    path = Path(path)
    what = what or path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}." if temp_prefix is None else temp_prefix
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=temp_suffix, dir=path.parent)
    except OSError as exc:
        _raise_if_full(exc, path, what, None)
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except (OSError, RuntimeError) as exc:
        try:
            _raise_if_full(exc, path, what, tmp_name)  # before removing the temp file: its bytes are not free
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        raise
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _raise_if_full(exc: BaseException, path: Path, what: str, tmp_name: str | None) -> None:
    try:
        written = os.path.getsize(tmp_name) if tmp_name else None
    except OSError:
        written = None
    full = disk_full(exc, path, what, written)
    if full is not None:
        raise full from exc


def read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one :class:`CheckpointError`
    naming the file for each way it can fail: missing, truncated or corrupt (or unreadable), or
    refused because loading it would run code."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A pickle that names a GLOBAL (a function or class to import) asks to run code; torch wraps
        # every other unpickling error too ("Unsupported operand" for garbage bytes): that is damage.
        if "GLOBAL" not in str(exc):
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: {_last_line(exc)}") from exc
        raise CheckpointError(f"checkpoint {str(path)!r} refused: loading it would need to import and run arbitrary "
                              f"code ({_refusal(exc)}); it was refused unexecuted: only tensors and plain values are "
                              "accepted (torch.load weights_only=True)") from exc
    except _CORRUPT_ERRORS as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt (is it a complete torch.save file?): "
                              f"{type(exc).__name__}: {_first_line(exc)[:200]}") from exc


def _refusal(exc: BaseException) -> str:
    # torch's message opens with advice to retry with weights_only=False; keep only what it refused.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    return named[0] if named else (lines[-1] if lines else type(exc).__name__)


def _last_line(exc: BaseException) -> str:
    # torch's wrapped unpickling errors end with the reason ("Unsupported operand 110").
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unwritable_reason(directory: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``directory`` (created when missing), or None when they can.

    Probed, not guessed from mode bits: a temporary file is created and removed in the directory, or
    in its nearest existing parent when it does not exist yet (where it would be created), so a
    read-only mount, a permission, an immutable attribute, root squash on NFS all answer as they
    will to the real write. The reason names the folder and the system's words, e.g.
    ``/data: Read-only file system``.
    """
    probe = Path(directory).expanduser().absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: creating the directory would fail
            return f"{probe} is a broken symbolic link"
        if probe.parent == probe:
            return f"{probe} does not exist"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} exists and is not a directory"
    try:
        handle, name = tempfile.mkstemp(dir=probe, prefix=".deepsports-probe-")
    except OSError as exc:
        return f"{probe}: {exc.strerror or exc}"
    os.close(handle)
    os.unlink(name)
    return None
