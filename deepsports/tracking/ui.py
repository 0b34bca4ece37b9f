"""Where MLflow's UI shows DeepSports' runs: the URLs every hint prints, and ``mlflow ui`` as ``deepsports ui``
starts it.

MLflow 3.17's UI keeps a GenAI / model-training switch in the browser and ignores the experiment's
``mlflow.experimentKind``: a plain experiment link opens the GenAI overview (traces, an assistant
panel). ``workflowType=machine_learning`` in the link opens the runs table (and a run's page) instead,
so every URL DeepSports prints carries it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: Where ``deepsports ui`` (and ``make ui``) serves a local store unless told otherwise.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5000
_VIEW = "workflowType=machine_learning"


def ui_base(store_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The UI's address: a tracking server is its own UI; a local store is shown by ``deepsports ui``."""
    if store_uri.split(":", 1)[0].lower() in ("http", "https"):
        return store_uri.rstrip("/")
    return f"http://{host}:{port}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table (a study's trials nested under its parent run)."""
    return f"{base}/#/experiments/{experiment_id}/runs?{_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (overview, metric charts, artifacts)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{_VIEW}"


def ui_hint(store_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """``<URL>`` plus how to serve it when the store is local: the line summaries print."""
    base = ui_base(store_uri)
    url = run_url(base, experiment_id, run_id) if run_id else runs_url(base, experiment_id)
    if base == store_uri.rstrip("/"):
        return url
    return f"{url}  (serve it with: deepsports ui)"


def ui_command(store_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1) -> list[str]:
    """``mlflow ui`` on ``host:port`` with few workers."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def ui_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ``mlflow ui``: MLflow's GenAI job runner off (its consumer processes and the
    memory they hold serve nothing DeepSports logs)."""
    env = dict(os.environ if environ is None else environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


#: The runs table ranked by validation Spearman: a study's trials (and retrainings) listed flat, best first
#: (MLflow nests child runs under their parent only when the table is sorted by time).
RANKED = "&orderByKey=metrics.%60best_val_spearman%60&orderByAsc=false"


def study_links(store_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """A study's two UI links: its trials ranked in the runs table, and its parent run's page."""
    base = ui_base(store_uri)
    return {"trials": runs_url(base, experiment_id) + RANKED, "study_run": run_url(base, experiment_id, parent_run_id)}


def run_link(store_uri: str, run_id: str) -> str | None:
    """The UI page of ``run_id`` (its experiment looked up in the store), or None when the store lacks it."""
    import mlflow

    from deepsports.errors import StorageError
    from deepsports.tracking.store import call_with_retry
    from deepsports.tracking.uris import allow_file_store, sqlite_path

    database = sqlite_path(store_uri)
    if database is not None and not database.is_file():
        return None  # opening it would create an empty store
    allow_file_store(store_uri)
    try:
        run = call_with_retry("get run", store_uri, mlflow.MlflowClient(store_uri).get_run, run_id)
    except StorageError:
        return None
    return run_url(ui_base(store_uri), run.info.experiment_id, run_id)
