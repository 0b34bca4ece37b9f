"""``deepsports status`` after a study lived through what a cluster does to it, on the real local SLURM cluster.

One array of two tasks runs a study of 4 trials: one task is requeued the cluster's way (``scontrol
requeue``: SIGTERM to the job) mid-trial, the other is SIGKILLed mid-trial (its trial is failed by the
surviving task's sweep and retried), and the first new trial after the first two runs out of memory through ``train``'s fault hook
(tests/slurm/fault_worker.py). The status document must then hold exactly those counts, causes and
links, compute figures consistent with the attempts' epoch timings, and the parent run the same; the
killed task's trial is failed, retried with its params from its last epoch checkpoint into its own
MLflow run, each epoch logged once (the SQLite/RDB sweep of a killed worker: tests/tune/test_tune_workers.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.slurm import jobs as slurm
from deepsports.slurm.profile import load_profile
from deepsports.tags import REASON_ATTR, RESUMED_ATTR, RETRIED_FROM_ATTR, RUN_ATTR, TASK_ATTR
from deepsports.tune.accounting import retried_from
from deepsports.tune.study import open_storage
from tests.e2e_helpers import PYTHON_BIN, REPO, TINY, TUNE_SPACE, deepsports_cmd, subprocess_env
from tests.slurm.test_slurm_tune import _active, _epochs_logged_once, _tasks, _wait

pytestmark = pytest.mark.slurm
optuna.logging.set_verbosity(optuna.logging.WARNING)

HEARTBEAT = 2
EPOCHS = 3


def _submit(tmp_path: Path, cache_dir: Path, storage: str, uri: str) -> str:
    profile = {"partition": "debug", "time": "15", "cpus_per_task": 1, "mem": "2G", "grace_seconds": 30,
               "array_size": 2, "array_concurrency": 2, "logdir": str(tmp_path / "logs"),
               "setup_lines": [f"export PATH={PYTHON_BIN}:$PATH"],
               "env": {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1",
                       "FAULT_FROM": "2",
                       "FAULT_MARKER": str(tmp_path / "fault-done"), "OMP_NUM_THREADS": "1"}}
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    settings = {**TINY, "cache_dir": str(cache_dir), "epochs": EPOCHS, "evaluate": "false"}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    args = [str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage, "--max-trials", "4", "--pruner", "none",
            "--seed", "0", "--heartbeat", str(HEARTBEAT), "--grace-period", "6", *sets]
    script = slurm.render_script("tune", load_profile(str(tmp_path / "profile.yaml")),
                                 [sys.executable, "-m", "tests.slurm.fault_worker", *args], job_name="st")
    return slurm.submit(script, cwd=tmp_path)


def _running_mid_training(storage: str, task: str | None = None, exclude: tuple = ()):
    try:
        study = optuna.load_study(study_name="s", storage=open_storage(storage))
    except (KeyError, ValueError):
        return None
    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.intermediate_values and t.user_attrs.get(TASK_ATTR) and t.number not in exclude
                 and (task is None or t.user_attrs[TASK_ATTR] == task)), None)


def _trial_state(storage: str, number: int) -> TrialState:
    return optuna.load_study(study_name="s", storage=open_storage(storage)).trials[number].state


def _check_the_killed_trial_and_its_retry(storage: str, killed, uri: str) -> None:
    """The killed task's trial: failed by the sweep, retried once with its params from its last epoch
    checkpoint, in its own MLflow run, each epoch logged once; the retry is no extra original trial."""
    trials = {t.number: t for t in optuna.load_study(study_name="s", storage=open_storage(storage)).trials}
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and "stopped beating" in dead.user_attrs[REASON_ATTR]
    (retry,) = [t for t in trials.values() if retried_from(t) == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs[RETRIED_FROM_ATTR] == killed.number and retry.number > killed.number
    assert retry.user_attrs[RUN_ATTR] == dead.user_attrs[RUN_ATTR]
    assert retry.user_attrs[RESUMED_ATTR]["epoch"] >= max(killed.intermediate_values) + 1
    assert sum(retried_from(t) is None for t in trials.values()) == 4  # max_trials originals
    client = MlflowClient(uri)
    run = client.get_run(retry.user_attrs[RUN_ATTR])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.retry_of"] == str(killed.number)
    assert "stopped beating" in run.data.tags["deepsports.failure_reason"]  # set by the sweeping worker
    _epochs_logged_once(client, run.info.run_id, EPOCHS)


def _check_the_requeued_task_resumed_its_trial(storage: str, preempted, requeued: str, logs: Path, uri: str) -> None:
    """The requeued task, restarted (restart 1), resumed its own paused trial from the checkpoint its pause
    wrote, in the same MLflow run (the USR1 path, with the array's other tasks free to claim it:
    tests/slurm/test_slurm_field_signals.py)."""
    trial = optuna.load_study(study_name="s", storage=open_storage(storage)).trials[preempted.number]
    checkpoint = trial.user_attrs[RESUMED_ATTR]["checkpoint"]
    run = MlflowClient(uri).get_run(trial.user_attrs[RUN_ATTR])
    assert run.data.tags["slurm.restart_count"] == "1" and run.data.tags["deepsports.resumes"] == "1"
    assert run.data.tags["deepsports.resumed_from"].startswith(Path(checkpoint).name)
    log = (logs / f"st_{requeued}.log").read_text()
    assert "restart 0," in log and "restart 1," in log and f"resuming from {checkpoint}" in log


def test_status_after_a_requeue_a_killed_worker_and_a_fault(slurm_cluster, tmp_path, tiny_cache_dir):
    storage, uri = str(tmp_path / "study.journal"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    job, logs = _submit(tmp_path, tiny_cache_dir, storage, uri), tmp_path / "logs"
    preempted = _wait(lambda: _running_mid_training(storage), 180, "a trial in training", job, logs)
    requeued = preempted.user_attrs[TASK_ATTR]
    other = f"{job}_{1 - int(requeued.split('_')[1])}"
    subprocess.run(["scontrol", "requeue", requeued], check=True)
    _wait(lambda: _trial_state(storage, preempted.number) == TrialState.WAITING, 60, "the pause", job, logs)
    killed = _wait(lambda: _running_mid_training(storage, other, (preempted.number,)), 180, "a trial in training "
                   "on the other task", job, logs)
    subprocess.run(["scancel", "--signal=KILL", "--batch", other], check=True)
    killed_at = time.time()
    _wait(lambda: not _active(job), 400, "the array to finish", job, logs)
    tasks = _tasks(job)
    assert tasks[requeued.split("_")[1]]["Restarts"] == "1"
    assert tasks[other.split("_")[1]]["JobState"] != "COMPLETED" and tasks[other.split("_")[1]]["Restarts"] == "0"
    _check_the_killed_trial_and_its_retry(storage, killed, uri)

    proc = subprocess.run(deepsports_cmd("status", "s", "--storage", storage, "--json"), env=subprocess_env(uri),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    trials = {t["number"]: t for t in doc["trials"]}
    (retry,) = doc["retries"]
    assert doc["states"] == {"COMPLETE": 3, "PRUNED": 0, "FAIL": 2, "RUNNING": 0, "WAITING": 0}, doc["trials"]
    causes = {cause: group["trials"] for cause, group in doc["failed"]["by_cause"].items() if group["count"]}
    (oom,) = causes.pop("out_of_memory")
    assert causes == {"dead_worker": [killed.number]} and oom >= 2 and trials[oom]["retry_of"] is None
    assert "out of memory" in trials[oom]["attempts"][0]["reason"] and (tmp_path / "fault-done").exists()
    # Lineage: the retry re-runs the killed trial with its params, linked both ways, and completed.
    assert retry["retry_of"] == killed.number and retry["state"] == "COMPLETE" and retry["dead_task"] == other
    assert doc["failed"]["retried_by"] == {str(killed.number): retry["trial"]}
    assert trials[killed.number]["retried_by"] == retry["trial"] and trials[retry["trial"]]["retry_of"] == killed.number
    assert doc["pauses"]["count"] == 1 and doc["pauses"]["per_task"] == {requeued: 1}
    assert [(a["outcome"], a["task"]) for a in trials[preempted.number]["attempts"]] == [
        ("paused", requeued), ("complete", requeued)]
    assert trials[preempted.number]["state"] == "COMPLETE"
    _check_the_requeued_task_resumed_its_trial(storage, preempted, requeued, logs, uri)
    assert doc["tasks"][other]["deaths"] == 1 and doc["tasks"][requeued]["pauses"] == 1

    # Compute, from the epoch timings: the dead attempt ends at its last heartbeat, at most one interval
    # before the kill; what it lost is its work since its last finished (checkpointed) epoch.
    (dead,) = trials[killed.number]["attempts"]
    last_epoch_end = dead["epochs"][-1]["end"]
    assert dead["outcome"] == "dead" and killed_at - HEARTBEAT - 1 <= dead["end"] <= killed_at + 1
    paused = trials[preempted.number]["attempts"][0]
    paused_lost = paused["end"] - max(paused["checkpoint_at"], paused["epochs"][-1]["end"])
    assert 0 <= paused_lost <= paused["end"] - paused["epochs"][-1]["end"]
    c = doc["compute"]
    assert c["lost_dead_s"] == pytest.approx(dead["end"] - last_epoch_end, abs=1e-2)
    assert abs(c["lost_dead_s"] - (killed_at - last_epoch_end)) <= HEARTBEAT + 1
    assert c["lost_preempted_s"] == pytest.approx(paused_lost, abs=1e-2)
    attempts = [a for t in doc["trials"] for a in t["attempts"]]
    assert c["spent_s"] == pytest.approx(sum(a["end"] - a["start"] for a in attempts), abs=1e-2)
    assert c["attempts"] == len(attempts) == 6  # 4 originals, a resume, a retry

    # The parent run holds the same numbers; the killed trial's run lists both attempts that wrote it.
    client = MlflowClient(uri)
    parent = client.get_run(doc["parent_run_id"])
    published = json.loads(Path(client.download_artifacts(parent.info.run_id, "study_status.json", str(tmp_path)))
                           .read_text())
    for key in ("states", "failed", "pauses", "retries", "tasks", "best"):
        assert published[key] == doc[key], key
    assert published["compute"]["spent_s"] == c["spent_s"] and published["compute"]["lost_s"] == c["lost_s"]
    metrics = parent.data.metrics
    assert (metrics["status_complete"], metrics["status_fail"], metrics["status_fail_dead_worker"],
            metrics["status_pauses"], metrics["status_retries"]) == (3, 2, 1, 1, 1)
    assert metrics["compute_lost_s"] == c["lost_s"]
    run = client.get_run(trials[killed.number]["run_id"])
    assert run.info.run_id == trials[retry["trial"]]["run_id"]
    assert run.data.tags["deepsports.attempts"] == "2" and run.data.tags["optuna.trial_number"] == str(killed.number)
    assert "stopped beating" in run.data.tags["deepsports.first_failure_reason"]
    saved = json.loads(Path(client.download_artifacts(run.info.run_id, "attempts.json", str(tmp_path))).read_text())
    assert [(a["trial"], a["task"], a["outcome"]) for a in saved] == [
        (killed.number, other, "dead"), (retry["trial"], requeued, "complete")]
