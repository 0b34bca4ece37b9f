"""A DDP training run launched the way a cluster user would: `submit train` with two tasks, srun, gloo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from deepsports.slurm.jobs import render_script, submit, worker_command
from deepsports.slurm.profile import build_profile
from tests.e2e_helpers import as_args, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return fields.get("JobState", "UNKNOWN")


def test_a_two_task_train_job_runs_one_ddp_run_through_srun(slurm_cluster, tmp_path, tiny_cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    profile = build_profile({
        "partition": "debug", "time": "10", "cpus_per_task": 1, "tasks_per_node": 2, "mem": "3G",
        "grace_seconds": 30, "logdir": str(tmp_path / "logs"),
        "env": {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"},
    }, "test")
    values = tiny_overrides(tmp_path, cache_dir=tiny_cache_dir, epochs=2, batch_size=5, evaluate="true")
    command = worker_command("train", *as_args(values), "run_name=srun-ddp",
                             f"checkpoint_dir={tmp_path / 'ckpt'}", python=sys.executable)
    script = render_script("train", profile, command, job_name="ddp-test")
    job_id = submit(script, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while _state(job_id) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    state = _state(job_id)
    if state != "COMPLETED":
        subprocess.run(["scancel", job_id], check=False)
    assert state == "COMPLETED", logs[-4000:]
    assert "rank 1 of 2 (srun" not in logs  # rank 1 logs warnings only
    assert logs.count('"run_id"') == 1  # rank 0 alone prints the summary

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
    assert [r.info.run_name for r in runs] == ["srun-ddp"]  # one MLflow run for both ranks
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["deepsports.world_size"] == "2"
    assert run.data.tags["slurm.job_id"] == job_id
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_spearman")) == [1, 2]
    assert "test_spearman" in run.data.metrics
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "epoch-0001.pt", "epoch-0002.pt",
                                                                     "run.json", "run.lock"]
