"""``make demo``: train through the MLflow Project on the synthetic data and say where to look.

Runs ``mlflow run . --env-manager local -P epochs=N`` against the tracking store in
``$MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``), then prints the run id, its test
Spearman with its 95 % bootstrap interval (and the "with true difficulty" figure) and how to open
``mlflow ui``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_demo(epochs: int = 10, params: list[str] | None = None) -> int:
    """Run the demo; returns the exit code of ``mlflow run`` (0 on success)."""
    from mlflow.tracking import MlflowClient

    from deepsports.tracking.runs import RunTracker
    from deepsports.tracking.ui import run_url, runs_url, ui_base
    from deepsports.tracking.uris import redact_uri, sqlite_path, tracking_uri

    project_dir = Path(__file__).resolve().parents[2]
    if not (project_dir / "MLproject").is_file():
        print(f"demo: no MLproject in {project_dir}: `deepsports demo` runs the MLflow Project of a clone of the "
              "repository (git clone ... && make demo); `deepsports train` works anywhere", file=sys.stderr)
        return 2
    uri = tracking_uri()
    database = sqlite_path(uri)
    if database is not None and not database.is_absolute():
        # `mlflow run` runs the entry point in the project folder: the store and checkpoints stay here.
        uri = f"sqlite:///{database.resolve()}"
    # Created before `mlflow run` (whose entry point runs in the project folder); artifacts go beside the store.
    RunTracker(uri).ensure_experiment("deepsports")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, DEEPSPORTS_CHECKPOINT_ROOT=str(Path("checkpoints").resolve()))
    # `mlflow run --env-manager local` runs `python` from PATH: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "run", str(project_dir), "--env-manager", "local",
           "--experiment-name", "deepsports", "-P", f"epochs={epochs}"]
    for item in params or []:
        cmd += ["-P", item]
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    proc = subprocess.run(cmd, env=env, cwd=project_dir)
    minutes = (time.time() - started) / 60
    if proc.returncode != 0:
        print(f"demo: `mlflow run` failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("deepsports")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    run = runs[0]
    metrics = run.data.metrics
    store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else redact_uri(uri)
    print("\n" + "=" * 72)
    print(f"run id:         {run.info.run_id}  (status {run.info.status}, {minutes:.1f} min)")
    print(f"test Spearman:  {_with_interval(metrics)}")
    print(f"tracking store: {store}")
    deepsports_bin = Path(sys.executable).parent / "deepsports"
    print(f"compare runs:   {deepsports_bin if deepsports_bin.exists() else 'deepsports'} ui   (mlflow ui on "
          "127.0.0.1:5000), then open")
    print(f"                {runs_url(ui_base(uri), experiment.experiment_id)}")
    print(f"this run:       {run_url(ui_base(uri), experiment.experiment_id, run.info.run_id)}")
    print("=" * 72)
    return 0


def _with_interval(metrics: dict[str, float]) -> str:
    """``0.8550 [0.8012, 0.8957]  (w/ true DD: ...)`` from a run's logged test metrics."""
    if "test_spearman" not in metrics:
        return "(not evaluated)"

    def one(name: str) -> str:
        value, low, high = (metrics.get(f"test_{name}{suffix}") for suffix in ("", "_ci_low", "_ci_high"))
        return f"{value:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else "")

    text = one("spearman")
    if "test_spearman_dd" in metrics:
        text += f"  (with true difficulty, the literature's protocol: {one('spearman_dd')}; 95% bootstrap CI)"
    return text
