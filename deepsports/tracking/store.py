"""Tracking-store plumbing: URIs and their redaction, SQLite journal mode, bounded retries.

Split from :mod:`deepsports.tracking.runs` (which re-exports these names); see its docstring for what was
read in MLflow's SQLite engine set-up and why WAL is enabled only on local file systems.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests  # an MLflow dependency
import sqlalchemy.exc  # an MLflow dependency
from mlflow.exceptions import MlflowException

from deepsports.errors import StorageError, disk_full
from deepsports.tracking.uris import (
    check_store_folder,
    redact_uri,
    sqlite_path,
)

log = logging.getLogger(__name__)

_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs", "9p")
_T = TypeVar("_T")
# What a store call raises when the store (not our code) fails. SQLAlchemy errors escape unwrapped
# from MLflow's engine creation; requests errors from artifact uploads to a server.
_STORE_ERRORS = (MlflowException, sqlite3.Error, sqlalchemy.exc.SQLAlchemyError, requests.RequestException, OSError)

def _filesystem_type(path: Path) -> str:
    """The mount type holding ``path`` (from /proc/mounts; '' where unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    target = str(path.resolve())
    found = [(len(mount), kind) for _, mount, kind, *_ in (line.split() for line in mounts if line.count(" ") >= 2)
             if target == mount or target.startswith(mount.rstrip("/") + "/")]
    return max(found)[1] if found else ""


def enable_sqlite_wal(uri: str, busy_timeout_s: float = 30.0) -> str | None:
    """Switch a SQLite store file to WAL journaling (persistent in the file). Returns the journal mode
    now in effect, or None for a non-SQLite URI. Left alone on a network file system (see module doc).
    """
    path = sqlite_path(uri)
    if path is None:
        return None
    check_store_folder(uri)
    fs_type = _filesystem_type(path.parent)
    if fs_type.startswith(_NETWORK_FS):
        log.warning("tracking store %s is on a %s file system: keeping SQLite's rollback journal (WAL needs "
                    "shared memory on one host); for many writers use mlflow server + PostgreSQL",
                    redact_uri(uri), fs_type)
        return _journal_mode(path, None, busy_timeout_s)
    return _journal_mode(path, "WAL", busy_timeout_s)


def _journal_mode(path: Path, mode: str | None, busy_timeout_s: float) -> str:
    connection = sqlite3.connect(path, timeout=busy_timeout_s)
    try:
        query = f"PRAGMA journal_mode={mode}" if mode else "PRAGMA journal_mode"
        return str(connection.execute(query).fetchone()[0]).lower()
    finally:
        connection.close()


# --- Retries ---

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay k is uniform in [d/2, d], d = min(max_delay, base * 2**k)."""

    max_attempts: int = 8
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_total_sleep_s: float = 30.0


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (lock contention, connection trouble, throttling, 5xx)."""
    text = str(exc).lower()
    if "database is locked" in text or "database is busy" in text or "database table is locked" in text:
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"):
            return True
        return exc.get_http_status_code() == 429 or exc.get_http_status_code() >= 500
    return isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def default_retry_policy(uri: str) -> RetryPolicy:
    """8 attempts for database stores; 1 for REST stores, whose MLflow client already retries 429/5xx/
    connection errors itself (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, ~4 min): a second layer
    would multiply the wait."""
    rest = uri.split(":", 1)[0].lower() in ("http", "https", "databricks")
    return RetryPolicy(max_attempts=1) if rest else RetryPolicy()


def call_with_retry(what: str, uri: str, fn: Callable[..., _T], *args: Any, policy: RetryPolicy | None = None,
                    **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)``, retried on transient errors (``policy`` defaults to
    :func:`default_retry_policy` of ``uri``); failures become :class:`StorageError`."""
    policy = policy or default_retry_policy(uri)
    slept = 0.0
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn(*args, **kwargs)
        except _STORE_ERRORS as exc:
            ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
            delay = random.uniform(ceiling / 2, ceiling)
            transient = is_transient(exc)
            full = disk_full(exc, _store_path(uri), f"{what} (tracking store {redact_uri(uri)})")
            if full is not None:
                raise full from exc  # retrying cannot help, and the message must say why
            if not transient or attempt == policy.max_attempts or slept + delay > policy.max_total_sleep_s:
                tries = f" after {attempt} attempts" if transient else ""
                raise StorageError(f"{what} failed on tracking store {redact_uri(uri)}{tries}: "
                                   f"{type(exc).__name__}: {redact_uri(_first_line(exc))}") from exc
            log.warning("%s on %s: %s; retrying in %.2f s (attempt %d/%d)", what, redact_uri(uri),
                        redact_uri(_first_line(exc)), delay, attempt, policy.max_attempts)
            time.sleep(delay)
            slept += delay
    raise AssertionError("unreachable")


def _store_path(uri: str) -> str:
    """The file a ``sqlite:///`` or ``file:`` store lives in (where a full disk matters), else the cwd
    (where MLflow puts local artifacts)."""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            return uri[len(prefix):] or "."
    return os.getcwd() if "://" in uri else uri


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
