"""Tuning arrays on the real local SLURM cluster: a study to completion, preemption and requeue, dead tasks.

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

from deepsports.train.checkpoints import CheckpointManager
from deepsports.tune.attrs import RESUMED_ATTR, RETRIED_FROM_ATTR, TASK_ATTR
from deepsports.tune.study import open_storage, retried_from
from deepsports.tune.attrs import CKPT_ATTR, PARENT_RUN_ATTR, REASON_ATTR, RUN_ATTR
from deepsports.train.loop import EPOCH_METRICS
from tests.e2e_helpers import TUNE_SPACE, PYTHON_BIN, REPO, TINY, deepsports_cmd, run_checked, subprocess_env

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


def _mid_training(storage: str):
    """A RUNNING trial that finished (checkpointed and reported) at least one epoch, or None."""
    try:
        running = _study(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except (KeyError, ValueError):  # the study does not exist yet
        return None
    return next((t for t in running if t.intermediate_values and TASK_ATTR in t.user_attrs), None)


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
    job, uri = _submit(tmp_path, cache_dir, storage, array_size=4, concurrency=2, max_trials=8, epochs=2)
    _wait(lambda: not _active(job), 240, "the array to finish", job, tmp_path / "logs")

    tasks = _tasks(job)
    assert sorted(tasks) == ["0", "1", "2", "3"]
    assert all((t["JobState"], t["ExitCode"], t["ArrayTaskThrottle"]) == ("COMPLETED", "0:0", "2") for t in tasks.values())
    study = _study(storage)
    assert all(t.state in FINISHED for t in study.trials), [(t.number, t.state) for t in study.trials]
    trained = [t for t in study.trials if not t.user_attrs.get(REASON_ATTR, "").startswith("not run")]
    assert [t.number for t in trained] == list(range(8)) and all(retried_from(t) is None for t in trained)

    client = MlflowClient(uri)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    experiment = client.get_run(parent).info.experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`deepsports.kind` = 'study'")
    assert [r.info.run_id for r in parents] == [parent]
    children = _children_by_trial(client, parent)
    assert sorted(children) == list(range(8))
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


def test_usr1_pauses_the_trial_requeues_the_task_and_it_resumes_the_same_trial_and_run(slurm_cluster, tmp_path,
                                                                                         cache_dir):
    storage = _storage(tmp_path, "journal")
    epochs = 12
    job, uri = _submit(tmp_path, cache_dir, storage, array_size=1, concurrency=1, max_trials=1, epochs=epochs)
    logs = tmp_path / "logs"
    victim = _wait(lambda: _mid_training(storage), 120, "a trial in training", job, logs)
    task = victim.user_attrs[TASK_ATTR]
    assert task == f"{job}_0"
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True)
    _wait(lambda: _tasks(job)["0"]["Restarts"] == "1" and _tasks(job)["0"]["JobState"] == "PENDING", 60,
          "the task to requeue itself", job, logs)
    paused = _study(storage).trials[0]
    assert paused.state == TrialState.WAITING and paused.user_attrs["deepsports.paused_by"] == task
    partial, _ = CheckpointManager(paused.user_attrs[CKPT_ATTR]).latest_valid()  # what the pause wrote
    # No `StartTime=now` here: released within SLURM's credential window (AuthInfo cred_expire, 10 s on
    # the local cluster) the relaunch is killed with "Job credential revoked". The requeued task's own
    # BeginTime (cred_expire + 1 s) is the earliest safe start.
    _wait(lambda: not _active(job), 180, "the requeued task to finish", job, logs)

    info = _tasks(job)["0"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    (trial,) = _study(storage).trials
    assert trial.state == TrialState.COMPLETE and trial.number == victim.number and trial.params == victim.params
    assert trial.user_attrs[RUN_ATTR] == paused.user_attrs[RUN_ATTR]
    assert trial.user_attrs[RESUMED_ATTR]["checkpoint"] == str(partial)
    resumed_epoch = trial.user_attrs[RESUMED_ATTR]["epoch"]
    assert resumed_epoch >= max(victim.intermediate_values) and sorted(trial.intermediate_values) == list(
        range(1, epochs + 1))
    client = MlflowClient(uri)
    run = client.get_run(trial.user_attrs[RUN_ATTR])
    assert run.info.status == "FINISHED" and run.data.tags["deepsports.resumes"] == "1"
    assert run.data.tags["slurm.restart_count"] == "1" and run.data.tags["deepsports.resumed_from"].startswith(
        partial.name)
    _epochs_logged_once(client, run.info.run_id, epochs)
    assert list(_children_by_trial(client, _study(storage).user_attrs[PARENT_RUN_ATTR])) == [trial.number]
    log = (logs / f"t_{job}_0.log").read_text()
    assert "restart 0," in log and "restart 1," in log and f"resuming from {partial}" in log


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_killed_task_fails_its_trial_and_another_task_retries_it(slurm_cluster, tmp_path, cache_dir, kind):
    storage = _storage(tmp_path, kind)
    epochs, max_trials = 6, 4
    job, uri = _submit(tmp_path, cache_dir, storage, array_size=2, concurrency=2, max_trials=max_trials,
                       epochs=epochs, extra=("--heartbeat", "2", "--grace-period", "6"))
    logs = tmp_path / "logs"
    victim = _wait(lambda: _mid_training(storage), 120, "a trial in training", job, logs)
    task = victim.user_attrs[TASK_ATTR]
    subprocess.run(["scancel", "--signal=KILL", "--batch", task], check=True)
    _wait(lambda: not _active(job), 240, "the array to finish", job, logs)

    tasks = _tasks(job)
    killed = tasks[task.split("_")[1]]
    assert killed["JobState"] != "COMPLETED" and killed["Restarts"] == "0"
    study = _study(storage)
    trials = {t.number: t for t in study.trials}
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and all(t.state in FINISHED for t in trials.values())
    if kind == "journal":  # Optuna's RDB sweep fails the trial before our callback could annotate it
        assert "stopped beating" in dead.user_attrs[REASON_ATTR]
    (retry,) = [t for t in trials.values() if retried_from(t) == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs[RETRIED_FROM_ATTR] == victim.number and retry.number > victim.number
    # The retry resumed the dead trial's last epoch checkpoint in the dead trial's MLflow run.
    assert retry.user_attrs[RUN_ATTR] == dead.user_attrs[RUN_ATTR]
    assert retry.user_attrs[RESUMED_ATTR]["epoch"] >= max(victim.intermediate_values) + 1
    originals = [t for t in trials.values() if retried_from(t) is None]
    assert len(originals) == max_trials
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == max_trials  # the study's count reached
    client = MlflowClient(uri)
    run = client.get_run(retry.user_attrs[RUN_ATTR])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.retry_of"] == str(victim.number)
    assert "stopped beating" in run.data.tags["deepsports.failure_reason"]  # set by the sweeping worker
    _epochs_logged_once(client, run.info.run_id, epochs)
