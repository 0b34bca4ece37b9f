"""The ecosystem as a user meets it, on one MLflow *file* store (``file:`` URI, no MLFLOW_ALLOW_FILE_STORE):
train, tune, status, best --retrain --register, evaluate models:/NAME@champion, and ``deepsports ui`` opened
in headless Chromium. One module fixture runs the commands once; the tests read what they left.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e_helpers import (
    TUNE_SPACE,
    as_args,
    deepsports_cmd,
    free_port,
    run_checked,
    subprocess_env,
    tiny_overrides,
)

pytestmark = pytest.mark.slow

_PICKLE_WARNING = "Pickle or CloudPickle"
_FILE_STORE_WARNING = "mlflow migrate-filestore --source"


@pytest.fixture(scope="module")
def file_store(tmp_path_factory, tiny_cache_dir) -> dict:
    """The commands of a user's session on a file store, each run once (outputs kept for the tests)."""
    home = tmp_path_factory.mktemp("filestore")
    uri = f"file://{home / 'mlruns'}"
    env = subprocess_env(uri)
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    env.pop("DEEPSPORTS_FILE_STORE_WARNED", None)
    tiny = tiny_overrides(home, cache_dir=tiny_cache_dir, epochs=1)
    out: dict = {"home": home, "uri": uri, "env": env}

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_checked(deepsports_cmd(*args), env, cwd=home, timeout=timeout)

    out["train"] = run("train", *as_args({**tiny, "log_model": "true", "evaluate": "false", "seed": "1",
                                          "system_metrics_interval_s": "1"}))
    space = home / "space.yaml"
    space.write_text(TUNE_SPACE)
    sets = [x for item in as_args({**tiny, "evaluate": "false"}) if not item.startswith("learning_rate=")
            for x in ("--set", item)]
    out["tune"] = run("tune", str(space), "--study", "s", "--n-trials", "2", *sets)
    out["status"] = run("status", "s")
    out["best"] = run("best", "s", "--retrain", "--register", "aqa", "--epochs", "1")
    out["evaluate"] = run("evaluate", "models:/aqa@champion", "--resamples", "100")
    return out


def _json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _client(store: dict):
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # this test process reads the store the commands wrote
    return MlflowClient(store["uri"], registry_uri=store["uri"])


def test_the_commands_run_on_a_file_store_with_one_warning_each_and_no_pickle(file_store):
    for name in ("train", "tune", "status", "best", "evaluate"):
        proc = file_store[name]
        assert proc.stderr.count(_FILE_STORE_WARNING) == 1, (name, proc.stderr[-3000:])
        assert _PICKLE_WARNING not in proc.stderr, name
    # The soft-Spearman-free default config logs its model with torch.export: no pickle, signature, example.
    client = _client(file_store)
    run_id = _json(file_store["train"])["run_id"]
    model_uri = client.get_run(run_id).data.tags["deepsports.model_uri"]
    import mlflow

    from deepsports.tracking.models import global_tracking_uri

    with global_tracking_uri(file_store["uri"]):  # restores the session's URI (None would mean ./mlflow.db)
        info = mlflow.models.get_model_info(model_uri)
    files = [f.path for f in client.list_logged_model_artifacts(model_uri.removeprefix("models:/"), "data")]
    assert files == ["data/model.pt2"]  # torch.export's program: no model.pth pickle
    assert info.signature is not None and info.saved_input_example_info is not None


def test_tune_prints_one_progress_line_per_trial_and_records_its_sampler(file_store):
    lines = [line for line in file_store["tune"].stderr.splitlines() if re.search(r"trial \d+ [A-Z]+: value", line)]
    assert len(lines) == 2, file_store["tune"].stderr[-3000:]
    assert "trial 0 COMPLETE: value " in lines[0] and "1 of this worker's n_trials=2 left" in lines[0]
    assert "trial 1 COMPLETE: value " in lines[1] and "0 of this worker's n_trials=2 left" in lines[1]
    assert all("best so far " in line for line in lines)

    from deepsports.tune.report import load_existing_study

    study = load_existing_study("s", file_store["home"] / "optuna-journal.log")
    import optuna

    expected = {"sampler": "TPESampler", "seed": 0, "n_startup_trials": 10, "multivariate": True, "group": True,
                "constant_liar": True, "n_ei_candidates": 24, "warn_independent_sampling": True,
                "optuna_version": optuna.__version__}
    assert study.user_attrs["deepsports.sampler"] == expected
    parent = _client(file_store).get_run(_json(file_store["tune"])["parent_run_id"])
    assert {k.removeprefix("optuna.sampler."): v for k, v in parent.data.tags.items()
            if k.startswith("optuna.sampler.")} == {k: str(v) for k, v in expected.items()}


def test_every_training_run_logs_system_metrics(file_store):
    client = _client(file_store)
    run_id = _json(file_store["train"])["run_id"]
    metrics = client.get_run(run_id).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage", "system/network_receive_megabytes"):
        assert key in metrics, sorted(metrics)
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(1, len(steps) + 1)) and steps  # counted from 1, as epochs: none at step 0 twice


def test_status_and_summaries_point_at_the_runs_table(file_store):
    tune = _json(file_store["tune"])
    experiment_id = _client(file_store).get_run(tune["parent_run_id"]).info.experiment_id
    base = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
    assert tune["ui"] == {"trials": f"{base}?workflowType=machine_learning&orderByKey=metrics.%60best_val_spearman%60"
                                    "&orderByAsc=false",
                          "study_run": f"{base}/{tune['parent_run_id']}?workflowType=machine_learning"}
    assert f"MLflow UI: {tune['ui']['trials']}\n  study run: {tune['ui']['study_run']}" in file_store["status"].stdout
    train = _json(file_store["train"])
    assert train["ui"] == f"{base}/{train['run_id']}?workflowType=machine_learning"
    assert _json(file_store["best"])["retrain"]["ui"].startswith(f"{base}/")


def test_best_registers_the_retrained_model_and_evaluate_loads_the_champion(file_store):
    client = _client(file_store)
    best = _json(file_store["best"])
    retrain_id = best["retrain"]["run_id"]
    assert best["registered"] == {"name": "aqa", "version": "1", "best_val_spearman": best["value"],
                                  "champion": "1", "champion_moved": True, "load": "models:/aqa@champion"}
    version = client.get_model_version_by_alias("aqa", "champion")
    assert version.run_id == retrain_id and version.tags["deepsports.study"] == "s"
    assert version.tags["deepsports.trial"] == str(best["best_trial"])
    assert float(version.tags["metric.best_val_spearman"]) == best["value"]
    evaluated = _json(file_store["evaluate"])
    assert evaluated["source_run_id"] == retrain_id
    assert client.get_run(evaluated["run_id"]).data.tags["deepsports.evaluated_model"] == "models:/aqa@champion"

    # pyfunc (the pt2 program MLflow stores) predicts exactly what the torch model of the checkpoint computes.
    import mlflow
    import torch

    from deepsports.model import build_model
    from deepsports.train.checkpoint_eval import checkpoint_config
    from deepsports.train.checkpoints import load_checkpoint

    ckpt = Path(client.get_run(retrain_id).data.tags["deepsports.checkpoint_dir"]) / "best.pt"
    state = load_checkpoint(ckpt)
    model = build_model(checkpoint_config(state, ckpt, {})).model.eval()
    model.load_state_dict(state["model"])
    config = checkpoint_config(state, ckpt, {})
    clip = np.random.default_rng(0).random((3, 3, config.frame_num, config.spatial_size, config.spatial_size),
                                           dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(clip)).numpy()
    from deepsports.tracking.models import global_tracking_uri

    with global_tracking_uri(file_store["uri"]):  # restores the session's URI (None would mean ./mlflow.db)
        predicted = np.asarray(mlflow.pyfunc.load_model("models:/aqa@champion").predict(clip))
    assert predicted.shape == (3, 2) and (predicted == expected).all()


def test_the_champion_alias_moves_only_to_a_better_version(file_store):
    from deepsports.tracking.registry import register_run_model

    client = _client(file_store)
    runs = {run_id: client.get_run(run_id).data.metrics["best_val_spearman"]
            for run_id in (_json(file_store["train"])["run_id"], _json(file_store["best"])["retrain"]["run_id"])}
    low, high = sorted(runs, key=runs.get)
    assert runs[low] < runs[high]
    first = register_run_model(low, "ranked", uri=file_store["uri"])
    better = register_run_model(high, "ranked", tags={"deepsports.study": "s"}, uri=file_store["uri"])
    worse = register_run_model(low, "ranked", uri=file_store["uri"])
    assert (first.version, first.promoted, first.champion_version) == ("1", True, "1")
    assert (better.version, better.promoted, better.champion_version) == ("2", True, "2")
    assert (worse.version, worse.promoted, worse.champion_version) == ("3", False, "2")
    assert str(client.get_model_version_by_alias("ranked", "champion").version) == "2"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed (.ci/run installs Debian's package)"
    return found


def dump_dom(url: str, budget_ms: int = 20000) -> str:
    """The DOM of ``url`` after the page's scripts ran (headless Chromium, virtual time)."""
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_deepsports_ui_opens_on_the_runs_table_with_the_study_trials(file_store):
    import psutil

    port = free_port()
    proc = subprocess.Popen(deepsports_cmd("ui", "--port", str(port)), env=file_store["env"], cwd=file_store["home"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server: list = []
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/") and \
            url.endswith("/runs?workflowType=machine_learning"), url
        # mlflow ui and its one uvicorn worker: no GenAI job consumers (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false).
        server = psutil.Process(proc.pid).children(recursive=True)
        assert len(server) <= 2, [p.cmdline()[:4] for p in server]
        table = dump_dom(url)
        assert "matching runs" in table and ">s<" in table, table[-3000:]  # the runs table, the study's parent
        assert "Traces overview" not in table and "Detect issues" not in table
        # The study link `tune` printed (served on this port): every trial in the table.
        trials = dump_dom(_json(file_store["tune"])["ui"]["trials"].replace("127.0.0.1:5000", f"127.0.0.1:{port}"))
        assert "s-trial-0000" in trials and "s-trial-0001" in trials, trials[-3000:]
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 130
    gone, alive = psutil.wait_procs(server, timeout=30)
    assert not alive, "mlflow ui outlived deepsports ui"


def test_system_metrics_continue_across_a_resume_without_doubled_steps(store_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) stays out of the clone
    from mlflow.tracking import MlflowClient

    from deepsports.tracking.runs import RunTracker

    def attempt(run_id: str | None) -> str:
        tracker = RunTracker(store_uri)
        run_id = tracker.start(run_id=run_id, system_metrics_interval_s=1)
        deadline = time.monotonic() + 30
        while len(tracker.logged_steps("system/cpu_utilization_percentage")) < (2 if run_id is None else 1) or \
                time.monotonic() < deadline - 27:
            assert time.monotonic() < deadline, "no system metrics within 30 s"
            time.sleep(0.5)
        tracker.end("FINISHED")
        return run_id

    run_id = attempt(None)
    first = sorted(RunTracker(store_uri).client.get_metric_history(run_id, "system/cpu_utilization_percentage"),
                   key=lambda m: m.step)
    attempt(run_id)
    history = MlflowClient(store_uri).get_metric_history(run_id, "system/cpu_utilization_percentage")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > len(first) >= 2
