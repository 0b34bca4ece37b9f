"""Optuna journal files that survive a writer killed mid-append.

Optuna's :class:`~optuna.storages.journal.JournalFileBackend` appends one JSON record per line. A
writer killed in the middle of an append (SIGKILL, node lost, a network file system that flushed only
part of a write) leaves an incomplete last line. Optuna skips it on read, but the next append lands
on the same line, which then decodes as garbage and the study can never be opened again.

:class:`TornTailJournalBackend` checks the tail under the journal's own lock, on open and before every
append: bytes after the last newline are a torn record (no writer holds the lock, so none is still
writing them). They are moved to a side file ``<journal>.torn-<UTC time>`` (kept, never dropped), the
journal is truncated to its last complete line, and one warning names the side file. A complete line
that is not a record is another matter (the file was edited or damaged): a line that is not JSON, or
JSON that is not a record of Optuna's journal format (no or an unknown ``op_code``, a key missing or
renamed, a value of the wrong type: :func:`record_problem`) raises
:class:`~deepsports.errors.JournalRecordError` (a :class:`~deepsports.errors.StorageError`, exit 6)
naming the line, on open and for lines other processes append later, and leaves the file untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from optuna.distributions import json_to_distribution
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.study import StudyDirection
from optuna.trial import TrialState

from deepsports.errors import JournalRecordError

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


# --------------------------------------------------------------------------------------------
# What a record is: Optuna's journal format, one JSON object per line
# --------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _iso_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _enum(kind: type) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not _is_int(value):
            return False
        try:
            kind(value)
        except ValueError:
            return False
        return True
    return check


def _distribution(value: Any) -> bool:
    try:
        json_to_distribution(value)
    except (ValueError, TypeError, KeyError, AttributeError):  # not JSON, or not a distribution's JSON
        return False
    return True


def _one_attr(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1


def _numbers_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(_is_number(v) for v in value))


def _step_values(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    try:
        steps = [int(key) for key in value]
    except ValueError:
        return False
    return len(steps) == len(value) and all(v is None or _is_number(v) for v in value.values())


_ID = (_is_int, "a whole number")
_STATE = (_enum(TrialState), "a trial state number")
_TEXT = (lambda v: isinstance(v, str), "text")
_ONE_ATTR = (_one_attr, "an object of one key")
_TIME = (_iso_time, "an ISO time")
_TIME_OR_NONE = (lambda v: v is None or _iso_time(v), "an ISO time or null")
_NUMBER_OR_NONE = (lambda v: v is None or _is_number(v), "a number or null")
_VALUES = (_numbers_or_none, "a list of numbers or null")
_OBJECT = (lambda v: isinstance(v, dict), "an object")
_DISTRIBUTION = (_distribution, "a distribution's JSON")

#: For each op code (optuna.storages.journal's JournalOperation): its name, the keys it must have and
#: the keys it may have, each with its check and what the check allows.
_OPS: dict[int, tuple[str, dict[str, tuple], dict[str, tuple]]] = {
    0: ("create study", {"study_name": _TEXT, "directions": (
        lambda v: isinstance(v, list) and bool(v) and all(_enum(StudyDirection)(d) for d in v),
        "a non-empty list of study direction numbers")}, {}),
    1: ("delete study", {"study_id": _ID}, {}),
    2: ("set study user attribute", {"study_id": _ID, "user_attr": _ONE_ATTR}, {}),
    3: ("set study system attribute", {"study_id": _ID, "system_attr": _ONE_ATTR}, {}),
    4: ("create trial", {"study_id": _ID, "datetime_start": _TIME_OR_NONE},
        {"state": _STATE, "value": _NUMBER_OR_NONE, "values": _VALUES, "datetime_complete": _TIME,
         "distributions": ((lambda v: isinstance(v, dict) and all(_distribution(d) for d in v.values())),
                           "an object of distributions' JSON"),
         "params": _OBJECT, "user_attrs": _OBJECT, "system_attrs": _OBJECT,
         "intermediate_values": (_step_values, "an object of step: number or null")}),
    5: ("set trial parameter", {"trial_id": _ID, "param_name": _TEXT,
                                "param_value_internal": ((_is_number), "a number"), "distribution": _DISTRIBUTION}, {}),
    6: ("set trial state", {"trial_id": _ID, "state": _STATE, "values": _VALUES},
        {"datetime_start": _TIME, "datetime_complete": _TIME}),
    7: ("set intermediate value", {"trial_id": _ID, "step": _ID, "intermediate_value": _NUMBER_OR_NONE}, {}),
    8: ("set trial user attribute", {"trial_id": _ID, "user_attr": _ONE_ATTR}, {}),
    9: ("set trial system attribute", {"trial_id": _ID, "system_attr": _ONE_ATTR}, {}),
}


def _external(distribution_json: str, internal: Any) -> bool:
    """The internal parameter value means something to its distribution (a categorical index in range...)."""
    try:
        json_to_distribution(distribution_json).to_external_repr(internal)
    except (ValueError, TypeError, IndexError, KeyError):
        return False
    return True


def record_problem(record: Any) -> str | None:
    """What makes a decoded journal line not a record Optuna can apply, or None when it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if "op_code" not in record:
        return "no op_code"
    op = record["op_code"]
    if not _is_int(op) or op not in _OPS:
        return f"unknown op_code {op!r} (expected 0-{max(_OPS)})"
    name, required, optional = _OPS[op]
    if not isinstance(record.get("worker_id"), str):
        return f"op_code {op} ({name}): worker_id missing or not text"
    for key in required:
        if key not in record:
            return f"op_code {op} ({name}): key {key!r} missing (keys: {', '.join(sorted(record))})"
    for key, (check, allowed) in {**required, **optional}.items():
        if key in record and not check(record[key]):
            return f"op_code {op} ({name}): {key}={json.dumps(record[key])[:80]} is not {allowed}"
    if op == 4 and "params" in record:
        distributions = record.get("distributions") or {}
        for key, internal in record["params"].items():
            if key not in distributions or not _external(distributions[key], internal):
                return f"op_code 4 ({name}): param {key!r}={internal!r} does not fit its distribution"
    if op == 5 and not _external(record["distribution"], record["param_value_internal"]):
        return f"op_code 5 ({name}): {record['param_value_internal']!r} does not fit its distribution"
    if op == 6:
        state = TrialState(record["state"])
        needs = "datetime_start" if state == TrialState.RUNNING else "datetime_complete" if state.is_finished() else None
        if needs and needs not in record:
            return f"op_code 6 ({name}): state {state.name} without {needs}"
    return None


def _not_a_record(path: str | os.PathLike, number: int, offset: int | None, why: str) -> JournalRecordError:
    where = f"line {number}" + (f" (byte {offset})" if offset is not None else "")
    return JournalRecordError(f"study journal {str(path)!r}: {where} is not a journal record ({why}); the file was left "
                              f"as it is: restore it from a copy, or remove that line by hand if it is not a record "
                              f"of the study")


def check_records(path: str | os.PathLike) -> None:
    """Raise :class:`JournalRecordError` naming the first complete line of ``path`` that is not a journal record."""
    with open(path, "rb") as handle:
        offset = 0
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return  # the torn tail: set aside on open
            try:
                record = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise _not_a_record(path, number, offset, f"not JSON: {exc}") from exc
            problem = record_problem(record)
            if problem is not None:
                raise _not_a_record(path, number, offset, problem)
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

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """Optuna's reader, each record checked (lines other processes appended after the open are checked here)."""
        records = super().read_logs(log_number_from)
        number = log_number_from
        while True:
            number += 1
            try:
                record = next(records)
            except StopIteration:
                return
            except ValueError as exc:  # Optuna's reader met a line that is not JSON before a complete one
                raise _not_a_record(self._file_path, number, None, f"not JSON: {exc}") from exc
            problem = record_problem(record)
            if problem is not None:
                raise _not_a_record(self._file_path, number, None, problem)
            yield record

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(record, separators=(",", ":")) for record in logs) + "\n"

        def write() -> None:
            with open(self._file_path, "ab") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())

        self._with_lock(write)
