"""End to end: the MLflow Project, the store it fills and the tracking server (resume after SIGKILL:
tests/reliability/test_crash_resume.py)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from deepsports.config import LOCATION_KEYS, config_fields
from deepsports.train.loop import EPOCH_METRICS
from tests.e2e_helpers import (
    PYTHON_BIN,
    REPO,
    copy_store,
    free_port,
    run_checked,
    subprocess_env,
    tiny_overrides,
    wait_for,
)

pytestmark = pytest.mark.slow

EPOCHS = 2


@pytest.fixture(scope="module")
def project_run(tmp_path_factory, tiny_cache_dir, migrated_store):
    """`mlflow run . --env-manager local` with a couple of epochs on a tiny synthetic set."""
    tmp_path = tmp_path_factory.mktemp("project")
    uri = copy_store(migrated_store, tmp_path)
    # `mlflow run` runs the entry point in the project folder (the clone): the checkpoints go to tmp_path.
    params = tiny_overrides(tmp_path, epochs=EPOCHS, log_model="true", evaluate="true", cache_dir=tiny_cache_dir,
                            checkpoint_dir=tmp_path / "ckpt")
    cmd = [str(PYTHON_BIN / "mlflow"), "run", str(REPO), "--env-manager", "local", "--experiment-name", "e2e"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    run_checked(cmd, subprocess_env(uri), cwd=tmp_path)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0], uri, params


def test_project_run_logs_every_param_and_one_point_per_epoch(project_run):
    client, run, _, params = project_run
    assert run.info.status == "FINISHED"
    # Every config key but the paths is a param; the paths are tags (issue #13: they are not what runs differ by).
    assert set(config_fields()) - set(LOCATION_KEYS) <= set(run.data.params)
    for key, value in params.items():
        logged = run.data.tags[f"deepsports.config.{key}"] if key in LOCATION_KEYS else run.data.params[key]
        assert logged == value, key
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)
    # A share of the epoch's training time: some waiting (the loader's workers start each epoch), never above it.
    waits = [m.value for m in client.get_metric_history(run.info.run_id, "data_wait_fraction")]
    assert all(0.0 < w <= 1.0 for w in waits), waits
    for key in ("test_spearman", "test_rel_l2", "test_mse", "test_difficulty_mae", "best_val_spearman"):
        assert np.isfinite(run.data.metrics[key]), key


def test_project_run_tags(project_run):
    _, run, _, _ = project_run
    tags = run.data.tags
    for key in ("deepsports.git_commit", "deepsports.git_dirty", "deepsports.host", "deepsports.device",
                "deepsports.version", "deepsports.trainable_params", "mlflow.project.entryPoint"):
        assert tags.get(key), key
    assert any(k.startswith("deepsports.dataset.") for k in tags)


def test_project_run_artifacts(project_run, tmp_path):
    client, run, _, params = project_run
    root = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for expected in ("config.yaml", "split.json", "plots/losses.png", "plots/scatter_val.png", "plots/scatter_test.png",
                     "predictions/predictions_val.csv", "predictions/predictions_test.csv", "checkpoints/best.pt"):
        assert expected in files, (expected, sorted(files))
    header = (root / "predictions/predictions_test.csv").read_text().splitlines()[0]
    assert header.split(",")[:4] == ["video", "clip", "true_score", "pred_score"]
    import yaml

    assert yaml.safe_load((root / "config.yaml").read_text())["frame_num"] == int(params["frame_num"])


def test_logged_model_loads_and_predicts(project_run):
    import mlflow

    client, run, uri, params = project_run
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert models, "no logged model"
    model_uri = f"models:/{models[0].model_id}"
    size = int(params["spatial_size"])
    clip = np.random.default_rng(0).random((2, 3, int(params["frame_num"]), size, size), dtype=np.float32)
    pyfunc_out = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(clip))
    assert pyfunc_out.shape == (2, 2) and np.isfinite(pyfunc_out).all()
    import torch

    torch_model = mlflow.pytorch.load_model(model_uri)
    with torch.no_grad():
        torch_out = torch_model(torch.from_numpy(clip)).numpy()
    np.testing.assert_allclose(torch_out, pyfunc_out, rtol=1e-5, atol=1e-6)


def test_mlflow_server_lists_the_runs_over_rest(project_run, tmp_path):
    _, run, uri, _ = project_run
    port = free_port()
    server = subprocess.Popen([str(PYTHON_BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            try:
                return urllib.request.urlopen(f"{base}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=90, what="mlflow server /health")
        body = json.dumps({"experiment_ids": [run.info.experiment_id]}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        found = json.loads(urllib.request.urlopen(request, timeout=10).read())
        ids = [r["info"]["run_id"] for r in found["runs"]]
        assert ids == [run.info.run_id]
        metrics = {m["key"] for m in found["runs"][0]["data"]["metrics"]}
        assert {"val_spearman", "test_spearman"} <= metrics
    finally:
        server.terminate()
        server.wait(timeout=30)

