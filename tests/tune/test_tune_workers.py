"""``deepsports tune --workers 2`` without SLURM: the same pause/resume and dead-worker semantics as an array.

The parent process plays the scheduler: a worker stopped alone by SIGUSR1 pauses its trial, exits 75
and is started again; a worker killed with SIGKILL stays dead and the other worker retries its trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.tags import (
    PARENT_RUN_ATTR,
    PAUSED_BY_ATTR,
    RESUMED_ATTR,
    RETRIED_FROM_ATTR,
    RUN_ATTR,
    TASK_ATTR,
    WORKER_ATTR,
)
from deepsports.tune.accounting import retried_from
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TINY, TUNE_SPACE, deepsports_cmd, local_env

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = TUNE_SPACE
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)



@pytest.fixture(scope="module")
def cache_dir(tiny_cache_dir) -> Path:
    return tiny_cache_dir


def _start(tmp_path: Path, cache_dir: Path, storage: str, *, max_trials: int, epochs: int,
           extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    settings = {**TINY, "cache_dir": str(cache_dir), "epochs": epochs, "evaluate": "false"}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    cmd = deepsports_cmd("tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage, "--workers", "2",
                         "--max-trials", str(max_trials), "--pruner", "none", "--seed", "0", *extra, *sets)
    proc = subprocess.Popen(cmd, env=local_env(uri, OMP_NUM_THREADS="1"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, uri


def _study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=open_storage(storage))


def _mid_training(proc: subprocess.Popen, storage: str, timeout_s: float = 120):
    """Wait for a RUNNING trial that finished (checkpointed and reported) at least one epoch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            running = _study(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (KeyError, ValueError):  # not created yet
            running = []
        found = next((t for t in running if t.intermediate_values and WORKER_ATTR in t.user_attrs), None)
        if found is not None:
            return found
        time.sleep(0.2)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"no trial in training after {timeout_s} s (exit {proc.returncode}):\n{err[-6000:]}")


def _worker_pid(trial) -> int:
    return int(trial.user_attrs[WORKER_ATTR].split()[0].rsplit(":", 1)[1])  # "<host>:<pid>"


def _epochs_logged_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in ("val_spearman", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), key


def _one_child_per_trial(client: MlflowClient, study: optuna.Study) -> dict[int, object]:
    parent = study.user_attrs[PARENT_RUN_ATTR]
    experiment = client.get_run(parent).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment], "tags.`deepsports.kind` = 'study'")] == [parent]
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_run = {r.info.run_id: r for r in runs}
    assert len(by_run) == len(runs)
    return by_run


def test_usr1_to_a_worker_pauses_its_trial_and_the_restarted_workers_resume_it(tmp_path, cache_dir):
    # 5 epochs (0.3-0.5 s each): the victim, signalled after its first, is still training for seconds.
    storage, epochs, max_trials = str(tmp_path / "study.journal"), 5, 3
    proc, uri = _start(tmp_path, cache_dir, storage, max_trials=max_trials, epochs=epochs)
    victim = _mid_training(proc, storage)
    os.kill(_worker_pid(victim), signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-6000:]
    assert "restarting it (restart 1)" in err
    summary = json.loads(out)  # one summary for the study, not one per worker
    assert summary["workers"] == 2 and summary["states"]["COMPLETE"] == max_trials

    study = _study(storage)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == list(range(max_trials)) and all(t.state == TrialState.COMPLETE for t in trials.values())
    trial = trials[victim.number]
    assert trial.params == victim.params and trial.user_attrs[PAUSED_BY_ATTR] == victim.user_attrs[TASK_ATTR]
    assert trial.user_attrs[RESUMED_ATTR]["epoch"] >= max(victim.intermediate_values)
    assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
    client = MlflowClient(uri)
    runs = _one_child_per_trial(client, study)
    assert sorted(runs) == sorted(t.user_attrs[RUN_ATTR] for t in trials.values())
    run = runs[trial.user_attrs[RUN_ATTR]]
    assert run.info.status == "FINISHED" and run.data.tags["deepsports.resumes"] == "1"
    assert run.data.tags["optuna.trial_number"] == str(victim.number) and "deepsports.resumed_from" in run.data.tags
    _epochs_logged_once(client, run.info.run_id, epochs)
    assert client.get_run(study.user_attrs[PARENT_RUN_ATTR]).info.status == "FINISHED"


# SQLite: Optuna's RDB heartbeat and stale-trial sweep. The journal's own sweep of a killed worker, with the
# same assertions, runs on the SLURM cluster (tests/slurm/test_slurm_status.py) and alone in tests/tune/test_status.py.
def test_a_killed_worker_fails_its_trial_and_the_other_worker_retries_it(tmp_path, cache_dir):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    epochs, max_trials = 6, 3
    proc, uri = _start(tmp_path, cache_dir, storage, max_trials=max_trials, epochs=epochs,
                       extra=("--heartbeat", "2", "--grace-period", "6"))
    victim = _mid_training(proc, storage)
    os.kill(_worker_pid(victim), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "1 of 2 tune workers failed" in err, err[-6000:]

    study = _study(storage)
    trials = {t.number: t for t in study.trials}
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and all(t.state in FINISHED for t in trials.values())
    (retry,) = [t for t in trials.values() if retried_from(t) == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs[RETRIED_FROM_ATTR] == victim.number
    assert retry.user_attrs[RUN_ATTR] == dead.user_attrs[RUN_ATTR]  # resumed the dead trial's run
    assert retry.user_attrs[RESUMED_ATTR]["epoch"] >= max(victim.intermediate_values) + 1
    assert sum(retried_from(t) is None for t in trials.values()) == max_trials
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == max_trials
    client = MlflowClient(uri)
    runs = _one_child_per_trial(client, study)
    run = runs[retry.user_attrs[RUN_ATTR]]
    assert run.info.status == "FINISHED" and run.data.tags["optuna.retry_of"] == str(victim.number)
    assert "stopped beating" in run.data.tags["deepsports.failure_reason"]
    _epochs_logged_once(client, run.info.run_id, epochs)
