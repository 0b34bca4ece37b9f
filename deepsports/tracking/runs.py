"""MLflow bridge for train, tune and slurm: explicit run ids, bounded retries, batched metrics.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never the fluent
active-run stack, so a study parent and its trials can be open in one process and
``MLFLOW_RUN_ID`` cannot turn a child into its parent (mlflow#15713).

Each call is retried on transient errors (SQLite "database is locked", connection errors,
TEMPORARILY_UNAVAILABLE / RESOURCE_EXHAUSTED / 429 / 5xx) with exponential backoff and jitter, then
raised as :class:`StorageError` naming the redacted URI. A retried metric batch cannot duplicate
points on a SQL store: a failed transaction rolls back, and MLflow drops a point identical in
(key, step, timestamp, value) to a stored one; timestamps are fixed before the first attempt.

SQLite (read in MLflow 3's ``store/db/utils.py``): the engine takes only pool settings from the
environment (``MLFLOW_SQLALCHEMYSTORE_POOL_SIZE/_MAX_OVERFLOW/_POOL_RECYCLE/_POOLCLASS/_ECHO``) and
``connect_args`` only for MySQL SSL, so there is no hook for SQLite pragmas; but every MLflow session
runs ``PRAGMA busy_timeout = 20000`` itself (a writer waits up to 20 s for a lock). The journal mode
lives in the database file, so :func:`enable_sqlite_wal` sets WAL once and all later MLflow
connections inherit it (readers stop blocking the writer). WAL needs memory shared by the processes
of one host: on NFS/Lustre/GPFS the store keeps its rollback journal, and many writers on several
nodes should use ``mlflow server`` with PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric, Param, RunTag

from deepsports.errors import PreemptedError, StorageError
from deepsports.tags import (
    FAILURE_REASON_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    HOST_TAG,
    MODEL_URI_TAG,
    PARAM_CHANGED_PREFIX,
    PYTHON_TAG,
    RESUMES_TAG,
    VERSION_TAG,
)
from deepsports.tracking.store import RetryPolicy, call_with_retry, default_retry_policy, enable_sqlite_wal
from deepsports.tracking.system_metrics import start_system_metrics
from deepsports.tracking.uris import allow_file_store, check_store_folder, redact_uri, sqlite_path, tracking_uri

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
#: MLflow's basic-auth app grants an experiment's creator MANAGE only after its create call has answered: another
#: task of the same user that finds the new experiment in that moment (or loses the race to create it) is refused
#: its first run (403). A refusal on an experiment younger than NEW_EXPERIMENT_S is retried for GRANT_WAIT_S;
#: on an older one (a user without permission) it is an error at once.
NEW_EXPERIMENT_S = 60.0
GRANT_WAIT_S = 10.0
#: Tags of the experiments DeepSports creates: MLflow's UI opens a model-training experiment on its runs
#: table (one without a kind opens on the GenAI overview, "Traces 0").
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
_MAX_METRICS, _MAX_PARAMS_TAGS, _MAX_TAG_VALUE = 1000, 100, 8000  # MLflow log_batch limits
_T = TypeVar("_T")


# --- Context tags ---

def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment_tags(cluster: Mapping[str, str] | None = None) -> dict[str, str]:
    """Code version and host of this process (git state of the deepsports source tree; ``git_dirty``
    ignores untracked files such as a local mlflow.db), and the compute job's ids the caller read
    (``cluster``: ``slurm.job_id``, ...; tracking is told them, it does not read the cluster)."""
    from deepsports import __version__

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    tags = {GIT_COMMIT_TAG: commit or "unknown",
            GIT_DIRTY_TAG: "unknown" if status is None else str(bool(status)).lower(),
            HOST_TAG: socket.gethostname(), VERSION_TAG: __version__,
            PYTHON_TAG: sys.version.split()[0]}
    tags.update(cluster or {})
    return tags


def _mlflow_context_tags(run_name: str | None) -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags  # what mlflow.start_run uses

    tags = dict(resolve_tags({}))
    if "mlflow.source.git.commit" not in tags and (commit := _git("rev-parse", "HEAD")):
        tags["mlflow.source.git.commit"] = commit
    if run_name:
        tags["mlflow.runName"] = run_name
    return tags


# --- Runs ---

class MetricBuffer:
    """Collects metric points and sends them with ``log_batch`` (<= 1000 per call); use for per-step metrics."""

    def __init__(self, tracker: RunTracker, max_points: int = _MAX_METRICS):
        self.tracker, self.max_points, self._points = tracker, max(1, min(max_points, _MAX_METRICS)), []

    def __len__(self) -> int:
        return len(self._points)

    def add(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        self._points.extend(Metric(key, float(value), stamp, int(step)) for key, value in metrics.items())
        if len(self._points) >= self.max_points:
            self.flush()

    def flush(self) -> None:
        while self._points:
            chunk = self._points[:self.max_points]
            self.tracker._log_batch("log metrics", metrics=chunk)
            del self._points[:len(chunk)]  # only after the store has them: a failed flush keeps them


def _artifacts_beside_store(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns/<experiment>`` in the store's own
    folder, whichever folder the first run of the experiment started in (MLflow's default, ``./mlruns/<id>``,
    follows the working directory: a run from another folder, a job's node or a test would scatter them)."""
    path = sqlite_path(uri)
    if path is None:
        return None  # a server decides for itself
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str(path.expanduser().absolute().parent / "mlruns" / slug)


@contextlib.contextmanager
def _store_init_lock(path: Path) -> Iterator[None]:
    """An exclusive flock serialising the first open of SQLite store ``path`` across processes.

    Held on the store's folder itself, so nothing is left beside the database; where a folder cannot
    be flocked (NFS forwards flock as a POSIX lock, which needs a file open for writing) on the file
    ``<db>.init-lock`` instead, as before.
    """
    import fcntl

    folder = path.expanduser().absolute().parent
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise StorageError(f"cannot open tracking store {path}: its folder {folder}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            try:
                fd = os.open(path.with_name(path.name + ".init-lock"), os.O_WRONLY | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StorageError(f"cannot open tracking store {path}: {exc}") from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class RunTracker:
    """One MLflow run: ``start`` (new, resumed or adopted from ``mlflow run``), log, ``end``.

    As a context manager it ends the run on exit: FINISHED, KILLED on KeyboardInterrupt or
    PreemptedError, else the exception's ``mlflow_status`` attribute or FAILED (with the reason
    in the ``deepsports.failure_reason`` tag).
    """

    def __init__(self, uri: str | None = None, retry: RetryPolicy | None = None, wal: bool = True):
        self.uri = uri or tracking_uri()
        allow_file_store(self.uri)
        self.retry = retry or default_retry_policy(self.uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.ended_status: str | None = None
        self._buffer: MetricBuffer | None = None
        self._system_metrics = None  # mlflow's SystemMetricsMonitor, while one runs
        self.client = self._open_store(wal)

    def _open_store(self, wal: bool) -> mlflow.MlflowClient:
        # Processes opening a new SQLite store at once would all run MLflow's schema creation and
        # trip over each other: the first call runs under an exclusive flock (_store_init_lock).
        path = sqlite_path(self.uri)
        if path is None:  # a server: the client connects lazily, so ask it something now
            client = self._call("open tracking store", mlflow.MlflowClient, tracking_uri=self.uri)
            self._call("open tracking store", client.search_experiments, max_results=1)
            return client
        check_store_folder(self.uri)
        with _store_init_lock(path):
            if wal:
                self._call("enable WAL", enable_sqlite_wal, self.uri)
            # MlflowClient builds a SQL store eagerly: tables are created/migrated here.
            return self._call("open tracking store", mlflow.MlflowClient, tracking_uri=self.uri)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id is None or self.ended_status is not None:  # nothing open, or ended explicitly
            return False
        if exc is None:
            self.end("FINISHED")
            return False
        status = getattr(exc, "mlflow_status", "FAILED")
        if isinstance(exc, (KeyboardInterrupt, PreemptedError)):
            status = "KILLED"
        try:
            self.set_tags({FAILURE_REASON_TAG: f"{type(exc).__name__}: {exc}"})
            self.end(status if status in RUN_STATUSES else "FAILED")
        except StorageError as storage_exc:  # never hide the exception that ended the run
            log.error("could not mark run %s as %s: %s", self.run_id, status, storage_exc)
        return False

    # --- plumbing ---
    def _call(self, what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return call_with_retry(what, self.uri, fn, *args, policy=self.retry, **kwargs)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("RunTracker.start() must be called before logging")
        return self.run_id

    def _log_batch(self, what: str, metrics=(), params=(), tags=()) -> None:
        self._call(what, self.client.log_batch, self._require_run(), metrics=list(metrics), params=list(params),
                   tags=list(tags))

    @property
    def buffer(self) -> MetricBuffer:
        if self._buffer is None:
            self._buffer = MetricBuffer(self)
        return self._buffer

    # --- lifecycle ---
    def ensure_experiment(self, name: str, artifact_location: str | None = None) -> str:
        """The id of the active experiment ``name``, created (as a model-training experiment) when missing."""
        experiment = self._call("get experiment", self.client.get_experiment_by_name, name)
        if experiment is None:
            artifact_location = artifact_location or _artifacts_beside_store(self.uri, name)
            try:
                return call_with_retry("create experiment", self.uri, self.client.create_experiment, name,
                                       artifact_location=artifact_location, tags=EXPERIMENT_TAGS, policy=self.retry)
            except StorageError as exc:  # another process created it between our two calls
                if getattr(exc.__cause__, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self._call("get experiment", self.client.get_experiment_by_name, name)
        if experiment.lifecycle_stage != "active":
            raise StorageError(f"experiment {name!r} is deleted in {redact_uri(self.uri)}: restore it "
                               f"(mlflow experiments restore) or choose another experiment_name")
        return experiment.experiment_id

    def start(self, experiment_name: str = "deepsports", run_name: str | None = None,
              parent_run_id: str | None = None, run_id: str | None = None,
              tags: Mapping[str, str] | None = None, artifact_location: str | None = None,
              cluster: Mapping[str, str] | None = None, system_metrics_interval_s: float = 0.0) -> str:
        """Open the run and return its id; ``cluster``: the job's ids to tag it with (see :func:`environment_tags`).

        * ``run_id`` given: resume that run (status back to RUNNING; params/metrics kept).
        * else ``$MLFLOW_RUN_ID`` set and no ``parent_run_id``: adopt the run ``mlflow run`` created
          for this entry point (the variable is consumed, as ``mlflow.start_run`` does).
        * else create a run in ``experiment_name`` (a child of ``parent_run_id`` when given).
        ``artifact_location`` only applies when the experiment is created here.
        ``system_metrics_interval_s`` > 0: log MLflow's system metrics (``system/*``: CPU, memory, disk,
        network; GPU utilisation and memory with nvidia-ml-py and an NVIDIA GPU) every that many seconds
        until :meth:`end`; a resumed run continues their steps after the last one logged.
        """
        if self.run_id is not None:
            raise RuntimeError(f"RunTracker already tracks run {self.run_id}")
        context = _mlflow_context_tags(run_name)
        env_run = os.environ.get("MLFLOW_RUN_ID")
        if run_id is None and env_run and parent_run_id is None:
            run_id = env_run
            os.environ.pop("MLFLOW_RUN_ID")
        if run_id is not None:
            run = self._call("get run", self.client.get_run, run_id)
            if run.info.lifecycle_stage != "active":
                raise StorageError(f"run {run_id} is deleted in {redact_uri(self.uri)}; it cannot be resumed")
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
            self._call("set run status", self.client.update_run, run_id, status="RUNNING")
            existing = run.data.tags
            resumes = int(existing.get(RESUMES_TAG, "-1")) + 1  # adopting a fresh mlflow-run run is 0
            new_tags = {k: v for k, v in context.items() if k not in existing}
            new_tags[RESUMES_TAG] = str(resumes)
            if run_name:
                new_tags["mlflow.runName"] = run_name
        else:
            self.experiment_id = self.ensure_experiment(experiment_name, artifact_location)
            if parent_run_id is not None:
                context["mlflow.parentRunId"] = parent_run_id
            run = self._create_run(context, run_name)
            self.run_id = run.info.run_id
            new_tags = {RESUMES_TAG: "0"}
        self.set_tags({**new_tags, **environment_tags(cluster), **dict(tags or {})})
        log.info("MLflow run %s in %s", self.run_id, redact_uri(self.uri))
        if system_metrics_interval_s > 0:
            self._system_metrics = start_system_metrics(self.run_id, self.uri, system_metrics_interval_s,
                                                        resumed=run_id is not None)
        return self.run_id

    def _create_run(self, tags: dict[str, str], run_name: str | None):
        """``create_run`` in the tracked experiment; a refusal (403) on a new experiment is waited out (see
        :data:`GRANT_WAIT_S`)."""
        deadline = time.monotonic() + GRANT_WAIT_S
        created_s: float | None = None  # the experiment's creation time, read at the first refusal
        while True:
            try:
                return self._call("create run", self.client.create_run, self.experiment_id, tags=tags,
                                  run_name=run_name)
            except StorageError as exc:
                if getattr(exc.__cause__, "error_code", "") != "PERMISSION_DENIED":
                    raise
                if created_s is None:
                    created_s = self._experiment_created_s()
                age_s = time.time() - created_s
                if age_s > NEW_EXPERIMENT_S or time.monotonic() >= deadline:
                    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
                    raise StorageError(f"{exc} ({user} may not write to experiment {self.experiment_id}: its owner or "
                                       f"an admin can grant EDIT)") from exc.__cause__
                log.info("create run refused on experiment %s, created %.1f s ago: waiting for the server to grant "
                         "its creator's permission", self.experiment_id, age_s)
                time.sleep(0.5)

    def _experiment_created_s(self) -> float:
        """When the tracked experiment was created (epoch seconds); 0 when this user cannot even read it."""
        try:
            created_ms = self._call("get experiment", self.client.get_experiment, self.experiment_id).creation_time
        except StorageError:  # not even readable (NO_PERMISSIONS): no grant is on its way
            return 0.0
        return (created_ms or 0) / 1000

    def end(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics and set the final status (FINISHED, FAILED or KILLED)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status={status!r}: expected one of {', '.join(RUN_STATUSES)}")
        run_id = self._require_run()
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is not None:
            monitor.finish()  # joins the sampling thread and flushes what it holds
        if self._buffer is not None:
            self._buffer.flush()
        self._call("end run", self.client.set_terminated, run_id, status=status)
        self.ended_status = status

    # --- logging ---
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as ``str``, credentials in URLs redacted).

        MLflow params are immutable: on a resumed run a key already logged with the same value is
        skipped, and a different value is recorded as the tag ``deepsports.param_changed.<key>``
        (holding the new value) instead of failing."""
        run = self._call("get run", self.client.get_run, self._require_run())
        existing = run.data.params
        fresh, changed = [], {}
        for key, value in params.items():
            value = redact_uri(str(value))
            if key not in existing:
                fresh.append(Param(key, value))
            elif existing[key] not in (value, shlex.quote(value)):  # `mlflow run` logs its -P values shell-quoted
                changed[f"{PARAM_CHANGED_PREFIX}{key}"] = value
                log.warning("param %s was logged as %r; this attempt uses %r (recorded as a tag)", key,
                            existing[key], value)
        for i in range(0, len(fresh), _MAX_PARAMS_TAGS):
            self._log_batch("log params", params=fresh[i:i + _MAX_PARAMS_TAGS])
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Log metric values at ``step`` now (one ``log_batch`` per 1000 values)."""
        stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        points = [Metric(key, float(value), stamp, int(step)) for key, value in metrics.items()]
        for i in range(0, len(points), _MAX_METRICS):
            self._log_batch("log metrics", metrics=points[i:i + _MAX_METRICS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as ``str`` with credentials in URLs redacted, cut to MLflow's 8000 characters)."""
        items = [RunTag(key, redact_uri(str(value))[:_MAX_TAG_VALUE]) for key, value in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS):
            self._log_batch("set tags", tags=items[i:i + _MAX_PARAMS_TAGS])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log artifact", self.client.log_artifact, self._require_run(), str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log artifacts", self.client.log_artifacts, self._require_run(), str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log text", self.client.log_text, self._require_run(), text, artifact_file)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        self._call("log dict", self.client.log_dict, self._require_run(), dict(dictionary), artifact_file)

    def logged_steps(self, metric_key: str) -> set[int]:
        """Steps at which ``metric_key`` is already logged (to skip them when a resumed run re-logs)."""
        history = self._call("get metric history", self.client.get_metric_history, self._require_run(), metric_key)
        return {int(m.step) for m in history}

    def fetch_run(self, run_id: str | None = None) -> mlflow.entities.Run:
        """The MLflow run ``run_id`` (default: the tracked one) as the store holds it now."""
        return self._call("get run", self.client.get_run, run_id or self._require_run())

    def log_model(self, model, example_input, **kwargs: Any) -> str:
        """:func:`deepsports.tracking.models.log_model` into this run; returns the model URI (also set as
        tag ``deepsports.model_uri``)."""
        kwargs.setdefault("retry", self.retry)
        from deepsports.tracking.models import log_model

        uri = log_model(model, example_input, self._require_run(), tracking_uri=self.uri, **kwargs)
        self.set_tags({MODEL_URI_TAG: uri})
        return uri


class NullTracker:
    """:class:`RunTracker`'s interface, logging nothing: the tracker of DDP ranks other than 0 (which
    only learn the run id from rank 0) and of benchmarks that measure what tracking costs."""

    def __init__(self, run_id: str | None = None):
        self.uri = "none"
        self.run_id = run_id
        self.ended_status: str | None = None

    def start(self, *args: Any, run_id: str | None = None, **kwargs: Any) -> str:
        import uuid

        self.run_id = run_id or self.run_id or uuid.uuid4().hex
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        self.ended_status = status

    def logged_steps(self, metric_key: str) -> set[int]:
        return set()

    def fetch_run(self, run_id: str | None = None) -> None:
        return None

    def log_model(self, model, example_input, **kwargs: Any) -> str:
        return ""

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        return None

    log_params = log_metrics = set_tags = log_artifact = log_artifacts = log_text = log_dict = _ignore
