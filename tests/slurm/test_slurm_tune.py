"""Tuning arrays on the real local SLURM cluster: a study to completion (and the helpers of the other
SLURM study tests: preemption and requeue in test_slurm_field_signals.py, a dead task and its retry in
test_slurm_status.py).

Every task is a real ``deepsports tune`` worker submitted with ``deepsports submit tune`` from a
profile; the workers share one study storage and one MLflow store in tmp_path. Trials are tiny
(one thread each): the cluster has two CPUs.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.tags import PARENT_RUN_ATTR, REASON_ATTR, RUN_ATTR, TASK_ATTR
from deepsports.train.loop import EPOCH_METRICS
from deepsports.tune.accounting import retried_from
from deepsports.tune.study import open_storage
from tests.e2e_helpers import PYTHON_BIN, REPO, TINY, TUNE_SPACE, deepsports_cmd, run_checked, subprocess_env

pytestmark = pytest.mark.slurm
optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = TUNE_SPACE
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)



@pytest.fixture(scope="module")
def cache_dir(tiny_cache_dir) -> Path:
    return tiny_cache_dir


def _submit(tmp_path: Path, cache_dir: Path, storage: str, *, array_size: int, concurrency: int, max_trials: int,
            epochs: int, extra: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> tuple[str, str]:
    """``deepsports submit tune`` from a profile in tmp_path; returns (array job id, tracking URI). ``drop``:
    tiny settings left at their defaults."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    profile = {"partition": "debug", "time": "10", "cpus_per_task": 1, "mem": "2G", "grace_seconds": 30,
               "array_size": array_size, "array_concurrency": concurrency, "logdir": str(tmp_path / "logs"),
               "setup_lines": [f"export PATH={PYTHON_BIN}:$PATH"],
               "env": {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}}
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    settings = {**TINY, "cache_dir": str(cache_dir), "epochs": epochs, "evaluate": "false"}
    sets = [arg for key, value in settings.items() if key not in ("learning_rate", *drop)
            for arg in ("--set", f"{key}={value}")]
    proc = run_checked(deepsports_cmd(
        "submit", "tune", "--profile", str(tmp_path / "profile.yaml"), "--storage", storage, "--job-name", "t",
        "--", str(tmp_path / "space.yaml"), "--study", "s", "--max-trials", str(max_trials), "--pruner", "none",
        "--seed", "0", *extra, *sets), subprocess_env(uri), cwd=tmp_path)
    match = re.search(r"submitted tune job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1), uri


def _tasks(job_id: str) -> dict[str, dict[str, str]]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    return {fields.get("ArrayTaskId", ""): fields
            for fields in (dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines())}


def _active(job_id: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def _wait(condition, timeout_s: float, what: str, job_id: str, logs: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    squeue = subprocess.run(["squeue", "-r", "-j", job_id], capture_output=True, text=True).stdout
    subprocess.run(["scancel", job_id], check=False)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (job {job_id}):\n{squeue}\n{tails}")


def _study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=open_storage(storage))


def _storage(tmp_path: Path, kind: str) -> str:
    return str(tmp_path / "study.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"


def _children_by_trial(client: MlflowClient, parent: str) -> dict[int, list]:
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    out: dict[int, list] = {}
    for run in runs:
        out.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    return out


def _epochs_logged_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in ("val_spearman", "train_loss"):
        assert key in EPOCH_METRICS
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), key


def test_an_array_of_four_tasks_two_at_once_runs_a_study_to_completion(slurm_cluster, tmp_path, cache_dir):
    storage = _storage(tmp_path, "journal")
    # Four trials: tasks 0 and 1 run two each; tasks 2 and 3 start after them and find the study complete.
    job, uri = _submit(tmp_path, cache_dir, storage, array_size=4, concurrency=2, max_trials=4, epochs=2)
    _wait(lambda: not _active(job), 240, "the array to finish", job, tmp_path / "logs")

    tasks = _tasks(job)
    assert sorted(tasks) == ["0", "1", "2", "3"]
    assert all((t["JobState"], t["ExitCode"], t["ArrayTaskThrottle"]) == ("COMPLETED", "0:0", "2") for t in tasks.values())
    study = _study(storage)
    assert all(t.state in FINISHED for t in study.trials), [(t.number, t.state) for t in study.trials]
    trained = [t for t in study.trials if not t.user_attrs.get(REASON_ATTR, "").startswith("not run")]
    assert [t.number for t in trained] == list(range(4)) and all(retried_from(t) is None for t in trained)

    client = MlflowClient(uri)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    experiment = client.get_run(parent).info.experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`deepsports.kind` = 'study'")
    assert [r.info.run_id for r in parents] == [parent]
    children = _children_by_trial(client, parent)
    assert sorted(children) == list(range(4))
    node = subprocess.run(["scontrol", "-o", "show", "job", f"{job}_0"], capture_output=True, text=True,
                          check=True).stdout
    for trial in trained:
        (run,) = children[trial.number]
        tags = run.data.tags
        assert run.info.run_id == trial.user_attrs[RUN_ATTR] and run.info.status == "FINISHED"
        assert tags["slurm.array_job_id"] == job and tags["slurm.array_task_id"] in tasks
        assert tags["slurm.job_id"] == tasks[tags["slurm.array_task_id"]]["JobId"]
        assert f"BatchHost={tags['slurm.node']}" in node and tags["slurm.restart_count"] == "0"
        assert trial.user_attrs[TASK_ATTR] == f"{job}_{tags['slurm.array_task_id']}"
