"""The MLflow bridge against a real SQLite MLflow store (one store per module: creating one costs seconds)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from deepsports.errors import StorageError
from deepsports.slurm.env import run_tags
from deepsports.tracking.runs import RunTracker
from deepsports.tracking.store import RetryPolicy, call_with_retry, enable_sqlite_wal
from deepsports.tracking.uris import redact_uri, sqlite_path, tracking_uri

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.2, max_total_sleep_s=1.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        RunTracker(uri)  # creates the tables once
        yield {"uri": uri, "artifacts": str(root / "artifacts"), "db": root / "mlflow.db"}


@pytest.fixture
def tracker(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return RunTracker(store["uri"])


def test_opening_a_new_store_leaves_nothing_but_the_database_beside_it(store):
    # The first open is serialised by a flock on the folder itself: no 0-byte mlflow.db.init-lock is left in
    # every working directory (issue #25); WAL's -wal/-shm files are SQLite's own.
    left = {p.name for p in store["db"].parent.iterdir()} - {"mlflow.db", "mlflow.db-wal", "mlflow.db-shm"}
    assert left == set()


def _start(tracker: RunTracker, store, **kwargs) -> str:
    return tracker.start(experiment_name="tests", artifact_location=store["artifacts"], **kwargs)


def _run(store, run_id):
    return MlflowClient(store["uri"]).get_run(run_id)


# --- URIs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    ("postgresql://alice:s3cr3t@db.example:5432/mlflow", "postgresql://alice:***@db.example:5432/mlflow"),
    ("mysql+pymysql://bob:p%40ss@host/db?charset=utf8", "mysql+pymysql://bob:***@host/db?charset=utf8"),
    ("https://user:tok@mlflow.example/", "https://user:***@mlflow.example/"),
    ("postgresql://host/db?user=carol&password=hunter2&sslmode=require",
     "postgresql://host/db?user=carol&password=***&sslmode=require"),
    ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://dave@host/db", "postgresql://dave@host/db"),
])
def test_redact_uri_hides_credentials(raw, shown):
    assert redact_uri(raw) == shown


def test_tracking_uri_defaults_to_sqlite_in_the_working_directory(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert str(sqlite_path("sqlite:////abs/x.db")) == "/abs/x.db"
    assert str(sqlite_path("sqlite:///rel/x.db?timeout=5")) == "rel/x.db"
    assert sqlite_path("postgresql://h/db") is None


def test_store_is_in_wal_mode(store):
    connection = sqlite3.connect(store["db"])
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()
    assert enable_sqlite_wal(store["uri"]) == "wal"
    assert enable_sqlite_wal("postgresql://u:p@h/db") is None


# --- runs ----------------------------------------------------------------------------------

def test_new_run_has_context_tags_and_slurm_ids(tracker, store, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    # The caller reads the job's ids (slurm.env) and tells the tracker: tracking never reads the cluster.
    run_id = _start(tracker, store, run_name="tagged", tags={"deepsports.device": "cpu"}, cluster=run_tags())
    tags = _run(store, run_id).data.tags
    assert tags["mlflow.runName"] == "tagged"
    for key in ("mlflow.source.name", "mlflow.source.type", "mlflow.user", "deepsports.git_commit",
                "deepsports.git_dirty", "deepsports.host", "deepsports.version"):
        assert tags[key], key
    assert tags["deepsports.git_dirty"] in ("true", "false", "unknown")
    assert (tags["slurm.job_id"], tags["slurm.array_task_id"], tags["deepsports.device"]) == ("4242", "7", "cpu")
    assert "slurm.array_job_id" not in tags
    assert _run(store, run_id).info.status == "RUNNING"
    tracker.end("FINISHED")
    assert _run(store, run_id).info.status == "FINISHED"


def test_params_metrics_and_artifacts(tracker, store, tmp_path):
    run_id = _start(tracker, store)
    tracker.log_params({"topology": "512,256", "epochs": 3, "storage": "postgresql://u:pw@db/optuna"})
    tracker.set_tags({"deepsports.study_storage": "mysql://root:hunter2@db/s?password=hunter2"})
    for epoch in (1, 2, 3):
        tracker.log_metrics({"val_spearman": 0.1 * epoch, "train_loss": 1.0 / epoch}, step=epoch)
    (tmp_path / "curve.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "curve.png", "plots")
    tracker.log_text("epochs: 3\n", "config.yaml")
    tracker.log_dict({"train": [[1, 2]]}, "split.json")
    tracker.end("FINISHED")
    run = _run(store, run_id)
    assert run.data.params == {"topology": "512,256", "epochs": "3", "storage": "postgresql://u:***@db/optuna"}
    assert run.data.tags["deepsports.study_storage"] == "mysql://root:***@db/s?password=***"
    assert tracker.logged_steps("val_spearman") == {1, 2, 3}
    history = MlflowClient(store["uri"]).get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    client = MlflowClient(store["uri"])
    assert {a.path for a in client.list_artifacts(run_id)} == {"plots", "config.yaml", "split.json"}
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/curve.png"]


def test_resume_keeps_params_and_records_changed_ones(tracker, store, monkeypatch):
    run_id = _start(tracker, store)
    tracker.log_params({"epochs": "3", "batch_size": "8"})
    tracker.log_metrics({"val_spearman": 0.4}, step=1)
    tracker.end("FAILED")
    again = RunTracker(store["uri"])
    assert again.start(experiment_name="tests", run_id=run_id) == run_id
    run = _run(store, run_id)
    assert run.info.status == "RUNNING" and run.data.tags["deepsports.resumes"] == "1"
    again.log_params({"epochs": "5", "batch_size": "8", "seed": "1"})  # epochs raised on resume
    assert again.logged_steps("val_spearman") == {1}
    again.end("FINISHED")
    run = _run(store, run_id)
    assert run.data.params == {"epochs": "3", "batch_size": "8", "seed": "1"}
    assert run.data.tags["deepsports.param_changed.epochs"] == "5"
    assert "deepsports.param_changed.batch_size" not in run.data.tags


def test_mlflow_run_id_is_adopted_once_and_never_hijacks_a_child(tracker, store, monkeypatch):
    client = MlflowClient(store["uri"])
    experiment = client.get_experiment_by_name("tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("tests", store["artifacts"])
    project_run = client.create_run(experiment_id, tags={"mlflow.source.type": "PROJECT"}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    child = RunTracker(store["uri"])
    child_id = child.start(experiment_name="tests", parent_run_id=project_run)
    assert child_id != project_run
    assert _run(store, child_id).data.tags["mlflow.parentRunId"] == project_run
    assert os.environ["MLFLOW_RUN_ID"] == project_run  # a child leaves it for whoever owns the project run
    assert _start(tracker, store) == project_run
    assert "MLFLOW_RUN_ID" not in os.environ  # consumed, as mlflow.start_run does
    tags = _run(store, project_run).data.tags
    assert tags["mlflow.source.type"] == "PROJECT"  # what `mlflow run` set is kept
    assert tags["deepsports.resumes"] == "0"
    child.end("FINISHED")
    tracker.end("FINISHED")


class _Pruned(Exception):
    mlflow_status = "KILLED"


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (ValueError("boom"), "FAILED"),
                                           (_Pruned("pruned at epoch 2"), "KILLED"), (KeyboardInterrupt(), "KILLED")])
def test_context_manager_sets_the_final_status(store, monkeypatch, error, status):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracker = RunTracker(store["uri"])
    with pytest.raises(type(error)) if error is not None else _nothing():
        with tracker:
            _start(tracker, store)
            if error is not None:
                raise error
    run = _run(store, tracker.run_id)
    assert run.info.status == status
    if error is not None:
        assert run.data.tags["deepsports.failure_reason"].startswith(type(error).__name__)


def test_an_explicit_end_is_not_overridden_by_the_context_manager(tracker, store):
    with tracker:
        run_id = _start(tracker, store)
        tracker.end("KILLED")
    assert _run(store, run_id).info.status == "KILLED"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_metric_buffer_batches_thousands_of_points(tracker, store):
    run_id = _start(tracker, store)
    for step in range(1250):
        tracker.buffer.add({"step_loss": step * 0.5, "lr": 1e-3}, step=step)
    assert len(tracker.buffer) < 1000  # flushed in batches of at most 1000 along the way
    tracker.end("FINISHED")  # flushes the rest
    client = MlflowClient(store["uri"])
    for key in ("step_loss", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1250))


def test_unknown_run_and_deleted_experiment_are_storage_errors(tracker, store):
    with pytest.raises(StorageError, match="get run"):
        tracker.start(experiment_name="tests", run_id="0" * 32)
    client = MlflowClient(store["uri"])
    client.delete_experiment(client.create_experiment("gone", artifact_location=store["artifacts"]))
    with pytest.raises(StorageError, match="'gone' is deleted"):
        RunTracker(store["uri"]).start(experiment_name="gone")


# --- retries under real SQLite lock contention ------------------------------------------------

def _hold_exclusive_lock(db, seconds: float, locked: threading.Event) -> threading.Thread:
    def hold() -> None:
        connection = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            connection.execute("COMMIT")
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def test_metric_logged_while_another_connection_holds_the_lock_lands_once(tracker, store):
    run_id = _start(tracker, store)
    locked = threading.Event()
    holder = _hold_exclusive_lock(store["db"], 1.0, locked)
    assert locked.wait(10)
    tracker.log_metrics({"contended": 1.5}, step=7)
    holder.join()
    tracker.end("FINISHED")
    history = MlflowClient(store["uri"]).get_metric_history(run_id, "contended")
    assert [(m.step, m.value) for m in history] == [(7, 1.5)]


def test_retry_rides_out_a_locked_database_and_gives_up_with_a_redacted_storage_error(tmp_path):
    db = tmp_path / "plain.db"
    setup = sqlite3.connect(db)
    setup.execute("CREATE TABLE t (x INTEGER)")
    setup.commit()
    setup.close()
    attempts = []

    def insert(value: int) -> None:
        attempts.append(value)
        connection = sqlite3.connect(db, timeout=0)  # fail at once instead of waiting for the lock
        try:
            connection.execute("INSERT INTO t VALUES (?)", (value,))
            connection.commit()
        finally:
            connection.close()

    locked = threading.Event()
    holder = _hold_exclusive_lock(db, 0.3, locked)
    assert locked.wait(10)
    call_with_retry("insert", f"sqlite:///{db}", insert, 1,
                    policy=RetryPolicy(max_attempts=20, base_delay_s=0.05, max_delay_s=0.2, max_total_sleep_s=10))
    holder.join()
    assert len(attempts) > 1
    assert sqlite3.connect(db).execute("SELECT x FROM t").fetchall() == [(1,)]

    attempts.clear()
    locked.clear()
    holder = _hold_exclusive_lock(db, 1.5, locked)  # longer than FAST_RETRY sleeps in total
    assert locked.wait(10)
    with pytest.raises(StorageError, match="database is locked") as info:
        call_with_retry("insert", "postgresql://alice:s3cr3t@db/mlflow", insert, 2, policy=FAST_RETRY)
    holder.join()
    assert "alice:***@" in str(info.value) and "s3cr3t" not in str(info.value)
    assert 1 < len(attempts) <= FAST_RETRY.max_attempts


def test_a_store_that_cannot_be_opened_is_a_storage_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot open tracking store"):
        RunTracker(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own HTTP retries take minutes
    with pytest.raises(StorageError, match=r"http://alice:\*\*\*@127\.0\.0\.1:9") as info:
        RunTracker("http://alice:pw@127.0.0.1:9")  # nothing listens on port 9
    assert ":pw@" not in str(info.value)


def test_permanent_errors_are_not_retried(tmp_path):
    calls = []

    def missing() -> None:
        calls.append(1)
        sqlite3.connect(tmp_path / "no" / "such" / "dir.db")

    with pytest.raises(StorageError, match="unable to open"):
        call_with_retry("open", "sqlite:///x.db", missing, policy=FAST_RETRY)
    assert len(calls) == 1


# --- the logged model --------------------------------------------------------------------------

class _TinyVideoRegressor(torch.nn.Module):
    """(B, C, T, H, W) -> (B, 2), like the AQA model."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 2)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(video.mean(dim=(2, 3, 4)))


def test_logged_model_loads_with_pytorch_and_pyfunc_and_predicts(tracker, store):
    torch.manual_seed(0)
    model = _TinyVideoRegressor().eval()
    run_id = _start(tracker, store)
    previous = mlflow.get_tracking_uri()
    model_uri = tracker.log_model(model, torch.rand(1, 3, 2, 8, 8))
    assert mlflow.get_tracking_uri() == previous  # the process-wide setting is restored
    tracker.end("FINISHED")
    assert _run(store, run_id).data.tags["deepsports.model_uri"] == model_uri

    batch = np.random.default_rng(0).random((3, 3, 2, 8, 8), dtype=np.float32)
    expected = model(torch.from_numpy(batch)).detach().numpy()
    loaded = mlflow.pytorch.load_model(model_uri)
    assert np.allclose(loaded(torch.from_numpy(batch)).detach().numpy(), expected, atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    assert np.allclose(np.asarray(pyfunc.predict(batch)), expected, atol=1e-6)  # any batch size: (-1, ...) signature
    inputs = pyfunc.metadata.signature.inputs.to_dict()[0]
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 3, 2, 8, 8]
