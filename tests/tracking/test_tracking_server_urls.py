"""`deepsports` writes through an MLflow tracking server given only MLFLOW_TRACKING_URI=http://...

No PostgreSQL here: deploy/mlflow-server.sh serves a SQLite store, artifacts proxied to a directory
of the server's. The training process never sees the store or the artifact directory; everything it
logs must arrive through the server's REST API, and is read back over plain HTTP.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepsports.config import LOCATION_KEYS, config_fields
from deepsports.train.loop import EPOCH_METRICS
from tests.e2e_helpers import REPO, as_args, deepsports_cmd, free_port, run_checked, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow

EPOCHS = 2


def _get(base: str, path: str, **query) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """deploy/mlflow-server.sh over a SQLite store, one worker; stopped (and checked stopped) at the end."""
    state = tmp_path_factory.mktemp("server")
    port = free_port()
    env = subprocess_env("unused", DEEPSPORTS_MLFLOW_DIR=str(state), DEEPSPORTS_MLFLOW_PORT=str(port),
                         DEEPSPORTS_MLFLOW_WORKERS="1", DEEPSPORTS_MLFLOW_BACKEND_URI=f"sqlite:///{state / 'server.db'}")
    script = str(REPO / "deploy" / "mlflow-server.sh")
    run_checked([script, "start"], env)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "state": state}
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 1 and "not running" in status.stdout


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory, tiny_cache_dir):
    """`deepsports train` (tiny, with a logged model) whose only tracking setting is the server's URL."""
    client_dir = tmp_path_factory.mktemp("client")
    overrides = tiny_overrides(client_dir, epochs=EPOCHS, log_model="true", evaluate="false",
                               experiment_name="through-server", cache_dir=tiny_cache_dir)
    run_checked(deepsports_cmd("train", *as_args(overrides)), subprocess_env(server["uri"], OMP_NUM_THREADS="2"),
                cwd=client_dir)
    experiment = _get(server["uri"], "/api/2.0/mlflow/experiments/get-by-name", experiment_name="through-server")
    runs = _post(server["uri"], "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment["experiment"]["experiment_id"]]})["runs"]
    assert len(runs) == 1, [r["info"]["run_id"] for r in runs]
    return {"run": runs[0], "overrides": overrides, "client_dir": client_dir}


def test_params_metrics_and_status_arrive_through_the_server(server, trained):
    run = trained["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    # Every hyperparameter is a param; the location keys are tags (deepsports.config.<key>).
    assert set(config_fields()) - set(LOCATION_KEYS) <= set(params) and not set(LOCATION_KEYS) & set(params)
    assert {f"deepsports.config.{key}" for key in LOCATION_KEYS} <= {t["key"] for t in run["data"]["tags"]}
    for key in ("frame_num", "spatial_size", "embed_dim", "epochs", "experiment_name"):
        assert params[key] == trained["overrides"][key], key
    run_id = run["info"]["run_id"]
    for key in EPOCH_METRICS:
        history = _get(server["uri"], "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)
        assert sorted(m["step"] for m in history["metrics"]) == list(range(1, EPOCHS + 1)), key
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert np.isfinite(latest["best_val_spearman"])


def test_artifacts_are_uploaded_to_the_server_not_the_client(server, trained):
    run_id = trained["run"]["info"]["run_id"]
    assert trained["run"]["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    listing = _get(server["uri"], "/api/2.0/mlflow/artifacts/list", run_id=run_id)
    names = {f["path"] for f in listing.get("files", [])}
    assert {"config.yaml", "split.json"} <= names, names
    query = urllib.parse.urlencode({"path": "config.yaml", "run_uuid": run_id})
    with urllib.request.urlopen(f"{server['uri']}/get-artifact?{query}", timeout=30) as response:
        served = response.read()
    assert yaml.safe_load(served)["frame_num"] == int(trained["overrides"]["frame_num"])
    stored = list((server["state"] / "artifacts").rglob(f"{run_id}/artifacts/config.yaml"))
    assert len(stored) == 1 and stored[0].read_bytes() == served
    # Nothing was written next to the client: no local store, no local artifact root.
    client_dir: Path = trained["client_dir"]
    assert not [p.name for p in client_dir.iterdir() if p.name in ("mlruns", "mlartifacts", "mlflow.db")]


def test_the_logged_model_loads_back_through_the_server(server, trained, monkeypatch):
    import mlflow

    run = trained["run"]
    # set_tracking_uri also sets the variable; monkeypatch restores it after set_tracking_uri(None) unsets it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    mlflow.set_tracking_uri(server["uri"])
    try:
        models = mlflow.search_logged_models(experiment_ids=[run["info"]["experiment_id"]], output_format="list")
        assert [m.source_run_id for m in models] == [run["info"]["run_id"]]
        size = int(trained["overrides"]["spatial_size"])
        clip = np.random.default_rng(0).random((2, 3, int(trained["overrides"]["frame_num"]), size, size),
                                               dtype=np.float32)
        out = np.asarray(mlflow.pyfunc.load_model(f"models:/{models[0].model_id}").predict(clip))
    finally:
        mlflow.set_tracking_uri(None)
    assert out.shape == (2, 2) and np.isfinite(out).all()
