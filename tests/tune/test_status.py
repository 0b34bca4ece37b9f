"""Study accounting without SLURM: attempts of a paused and resumed trial, a fault, a dead worker's trial and
its retry, ``deepsports status`` (text and --json), the parent run's copy, ``--rerun-failed`` and
``submit tune --missing`` (the same on the real cluster: tests/slurm/test_slurm_status.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.errors import ConfigError, PreemptedError
from deepsports.tags import (
    ATTEMPTS_ATTR,
    EPOCH_END_PREFIX,
    HEARTBEAT_ATTR,
    RERUN_BY_PREFIX,
    RERUN_OF_ATTR,
    RETRIED_BY_PREFIX,
    RUN_ATTR,
)
from deepsports.train.loop import train
from deepsports.tune import accounting, recovery
from deepsports.tune.accounting import retried_from
from deepsports.tune.checks import check_causes
from deepsports.tune.settings import TuneSettings
from deepsports.tune.status import render_text, study_status
from deepsports.tune.study import open_storage
from deepsports.tune.worker import tune
from tests.e2e_helpers import TINY, TUNE_SPACE, deepsports_cmd, subprocess_env, wait_for

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _oom_in_trial_1(config, **kwargs):
    """Trial 1 runs out of memory at its second step (``train``'s fault hook); the others train."""
    def hook(where: str, step: int) -> None:
        if where == "step" and step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    if kwargs["tags"]["optuna.trial_number"] == "1":
        kwargs["hooks"] = dataclasses.replace(kwargs["hooks"], fault_hook=hook)
    return train(config, **kwargs)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_cache_dir):
    """One real study of 3 trials x 2 epochs: trial 0 preempted mid epoch 2 and resumed, trial 1 out of memory."""
    path = tmp_path_factory.mktemp("status")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    (path / "space.yaml").write_text(textwrap.dedent("fixed: {epochs: 2}\n" + TUNE_SPACE))
    overrides = {k: v for k, v in {**TINY, "cache_dir": str(tiny_cache_dir), "evaluate": False}.items()
                 if k != "learning_rate"}
    settings = TuneSettings(search_space=str(path / "space.yaml"), study_name="s", storage=str(path / "study.journal"),
                            max_trials=3, seed=0, pruner="none", checkpoint_root=str(path / "ckpt"),
                            overrides=overrides, parent_wait_s=5.0)
    polls = {"n": 0}

    def stop_mid_epoch_2() -> bool:  # the SIGUSR1 flag of a SLURM job
        polls["n"] += 1
        return polls["n"] >= 9

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        with pytest.raises(PreemptedError):
            tune(settings, stop_requested=stop_mid_epoch_2, train_fn=_oom_in_trial_1)
        tune(settings, train_fn=_oom_in_trial_1)  # the requeued worker: resumes trial 0, then trials 1 and 2
    return path, settings, uri


def _status(path: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(deepsports_cmd("status", "s", "--storage", str(path / "study.journal"), *args),
                          env=subprocess_env(uri), cwd=path, capture_output=True, text=True, timeout=120)


def test_status_json_accounts_for_every_attempt_failure_and_second(study_dir):
    path, settings, uri = study_dir
    proc = _status(path, uri, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["states"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    assert doc["max_trials"] == 3 and doc["original_trials"] == 3 and doc["running"] == doc["waiting"] == []
    by_cause = doc["failed"]["by_cause"]
    assert by_cause["out_of_memory"]["trials"] == [1]
    assert sum(group["count"] for group in by_cause.values()) == doc["failed"]["total"] == 1
    trials = {t["number"]: t for t in doc["trials"]}
    paused, resumed = trials[0]["attempts"]
    assert [paused["outcome"], resumed["outcome"]] == ["paused", "complete"]
    assert [e["epoch"] for e in paused["epochs"]] == [1] and [e["epoch"] for e in resumed["epochs"]] == [2]
    assert resumed["resumed_epoch"] == 2 and paused["end"] <= resumed["start"]
    assert doc["pauses"]["count"] == 1 and doc["pauses"]["events"][0]["trial"] == 0
    # Compute: every attempt's wall time; lost = the preempted attempt's work after its last checkpoint.
    attempts = [a for t in doc["trials"] for a in t["attempts"]]
    assert doc["compute"]["attempts"] == len(attempts) == 4
    assert doc["compute"]["spent_s"] == pytest.approx(sum(a["end"] - a["start"] for a in attempts), abs=1e-2)
    for a in attempts:
        assert sum(e["seconds"] for e in a["epochs"]) <= a["end"] - a["start"] + 1e-3
    assert paused["epochs"][0]["end"] <= paused["checkpoint_at"] <= paused["end"]  # the pause wrote a checkpoint
    assert doc["compute"]["lost_s"] == doc["compute"]["lost_preempted_s"] == pytest.approx(
        paused["end"] - paused["checkpoint_at"], abs=1e-2)
    failed = trials[1]["attempts"][0]
    assert failed["outcome"] == "failed" and "out of memory" in failed["reason"]
    assert doc["compute"]["failed_s"] == pytest.approx(failed["end"] - failed["start"], abs=1e-2)
    # Finished = a result (complete or pruned); the failed trial is counted apart, not in the rate.
    assert doc["compute"]["trials_finished"] == 2 and doc["compute"]["trials_failed"] == 1
    assert doc["compute"]["trials_per_hour"] == pytest.approx(2 / (doc["compute"]["span_s"] / 3600), rel=1e-3)
    complete = [t for t in doc["trials"] if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    assert doc["best"] == {"trial": best["number"], "value": best["value"], "run_id": best["run_id"]}


def test_status_screen_and_the_parent_run_say_the_same(study_dir):
    path, settings, uri = study_dir
    text = _status(path, uri)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].startswith("trials") and "2 COMPLETE, 0 PRUNED, 1 FAIL, 0 RUNNING, 0 WAITING" in lines[1]
    assert any(line.startswith("failed") and "out of memory: 1 (trials 1)" in line for line in lines), lines
    assert any(line.startswith("pauses") and "1 (per task:" in line for line in lines), lines
    (rate,) = [line for line in lines if line.startswith("rate")]
    assert " finished trials/hour (2 complete or pruned, 1 failed, in " in rate, rate
    doc = json.loads(_status(path, uri, "--json").stdout)
    client = MlflowClient(uri)
    parent = client.get_run(doc["parent_run_id"])
    published = json.loads(Path(client.download_artifacts(parent.info.run_id, "study_status.json", str(path)))
                           .read_text())
    for key in ("states", "failed", "pauses", "retries", "reruns", "best", "tasks"):
        assert published[key] == doc[key], key
    assert published["compute"]["spent_s"] == doc["compute"]["spent_s"]
    assert parent.data.metrics["status_complete"] == 2 and parent.data.metrics["status_fail_out_of_memory"] == 1
    assert parent.data.metrics["compute_spent_s"] == doc["compute"]["spent_s"]
    assert "| compute |" in Path(client.download_artifacts(parent.info.run_id, "study_status.md", str(path))).read_text()
    # The resumed trial's run lists both attempts.
    run = client.get_run(doc["trials"][0]["run_id"])
    assert run.data.tags["deepsports.attempts"] == "2" and "paused" in run.data.tags["deepsports.attempt.1"]
    attempts = json.loads(Path(client.download_artifacts(run.info.run_id, "attempts.json", str(path))).read_text())
    assert [a["outcome"] for a in attempts] == ["paused", "complete"]


def test_bad_input_exits_2_with_one_line(study_dir):
    path, settings, uri = study_dir
    env = subprocess_env(uri)
    cases = [deepsports_cmd("status", "nope", "--storage", str(path / "study.journal")),
             deepsports_cmd("status", "s", "--storage", str(path / "missing.journal")),
             deepsports_cmd("tune", str(path / "space.yaml"), "--study", "s", "--storage", str(path / "study.journal"),
                            "--rerun-failed", "--cause", "gremlins"),
             deepsports_cmd("tune", str(path / "space.yaml"), "--study", "s", "--storage", str(path / "study.journal"),
                            "--cause", "out_of_memory"),
             deepsports_cmd("submit", "tune", "--missing", "--", str(path / "space.yaml"), "--study", "s"),
             deepsports_cmd("submit", "train", "--missing", "--", "epochs=1")]
    for cmd in cases:
        proc = subprocess.run(cmd, env=env, cwd=path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("deepsports: error:"), proc.stderr
    with pytest.raises(ConfigError, match="'gremlins'"):
        check_causes(["gremlins"])


def test_best_and_status_from_another_folder_use_the_store_the_study_recorded(study_dir, tmp_path):
    """A user in another folder, no MLFLOW_TRACKING_URI set: the study says where its runs are (issue #25 saw
    exit 6, "Run with id=... not found", and an empty mlflow.db and experiments/ created where the user stood)."""
    path, settings, uri = study_dir
    env = subprocess_env(uri)
    env.pop("MLFLOW_TRACKING_URI")
    storage = str(path / "study.journal")
    status = subprocess.run(deepsports_cmd("status", "s", "--storage", storage), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stderr == "", status.stderr
    assert list(tmp_path.iterdir()) == []
    best = subprocess.run(deepsports_cmd("best", "s", "--storage", storage), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert best.returncode == 0, best.stderr[-3000:]
    assert "Warning" not in best.stderr and "site-packages" not in best.stderr, best.stderr  # no library noise
    out = json.loads(best.stdout)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["experiments", "experiments/s_best.yaml"]
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(out["parent_run_id"], "study_plots")}
    assert {f"study_plots/{name}" for name in ("optimization_history.png", "intermediate_values.png")} <= logged
    assert client.get_run(out["parent_run_id"]).info.status == "FINISHED"


def test_rerun_failed_reruns_only_the_failed_trial_and_submit_missing_then_submits_nothing(study_dir):
    path, settings, uri = study_dir
    study = optuna.load_study(study_name="s", storage=open_storage(settings.storage))
    assert accounting.enqueue_reruns(study, ["non_finite_loss"]) == []  # no trial failed for that cause
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    missing = ["submit", "tune", "--missing", "--dry-run", "--profile", "local", "--",
               str(path / "space.yaml"), "--study", "s", "--storage", settings.storage, "--max-trials", "3"]
    proc = subprocess.run(deepsports_cmd(*missing, "--rerun-failed"), env=subprocess_env(uri), cwd=path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "#SBATCH --array=0-0" in proc.stdout, proc.stderr  # one task: the re-run

    sets = [arg for key, value in settings.overrides.items() for arg in ("--set", f"{key}={value}")]
    proc = subprocess.run(deepsports_cmd("tune", settings.search_space, "--study", "s", "--storage", settings.storage,
                                         "--rerun-failed", "--cause", "out_of_memory", "--pruner", "none", *sets),
                          env=subprocess_env(uri), cwd=path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["trials_run_by_this_worker"] == 1
    study = optuna.load_study(study_name="s", storage=open_storage(settings.storage))
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 4  # nothing new sampled
    rerun = trials[3]
    assert rerun.state == TrialState.COMPLETE and rerun.params == failed.params
    assert rerun.user_attrs[RERUN_OF_ATTR] == failed.number
    assert study.user_attrs[f"{RERUN_BY_PREFIX}{failed.number}"] == rerun.number
    assert rerun.user_attrs[RUN_ATTR] != failed.user_attrs.get(RUN_ATTR)  # a fresh training, its own run
    assert accounting.enqueue_reruns(study) == []  # re-run once only
    doc = study_status(study)
    assert doc["reruns"] == [{"trial": 3, "rerun_of": 1, "state": "COMPLETE", "cause": "out_of_memory"}]

    proc = subprocess.run(deepsports_cmd(*[a for a in missing if a != "--dry-run"]), env=subprocess_env(uri),
                          cwd=path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and "nothing submitted" in proc.stdout
    assert "is complete" in proc.stdout and "submitted tune job" not in proc.stdout


_DYING_WORKER = """\
import sys, time, optuna
from deepsports.tune._optuna_compat import trial_id_of
from deepsports.tune.accounting import AttemptLedger
from deepsports.tune.recovery import TrialHeartbeat
from deepsports.tune.study import open_storage
study = optuna.create_study(study_name="dead", storage=open_storage(sys.argv[1]), direction="maximize")
beats = []
for number, interval in enumerate((1, 6)):  # trial 0 beats after its epoch, trial 1 not before the kill
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    ledger = AttemptLedger(study, trial_id_of(trial), trial.number, f"node/worker-{7 + number}", "node:1",
                           heartbeat_s=interval, grace_s=2 * interval)
    beats.append(TrialHeartbeat(study, trial_id_of(trial), interval=interval).__enter__())  # beats now, then every interval
    ledger.start()
    time.sleep(0.3)
    ledger.epoch(1)  # the epoch's checkpoint is on disk
print("training", flush=True)
time.sleep(600)  # the next epoch's steps, killed here
"""


def test_a_killed_workers_attempt_is_dead_its_work_since_the_last_epoch_lost_and_its_retry_linked(tmp_path,
                                                                                                     store_uri,
                                                                                                     monkeypatch):
    """Two trials of a worker killed a second into their next epoch: trial 0 beat after its last epoch, trial 1
    last beat before it (issue 26: that one's lost compute read 0). Each dead attempt ends in the middle of
    the window its death lies in; what it lost is its steps' time since the epoch, within the interval."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)  # where the sweep ends the dead trials' runs
    storage = str(tmp_path / "dead.journal")
    proc = subprocess.Popen([sys.executable, "-c", _DYING_WORKER, storage], env=subprocess_env(store_uri),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "training"

    def trials() -> list:
        return optuna.load_study(study_name="dead", storage=open_storage(storage)).get_trials(deepcopy=False)

    def beat_a_second_after_the_epoch() -> bool:  # trial 0: what its dead attempt's end is judged by below
        trial = trials()[0]
        return float(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0)) - trial.user_attrs[f"{EPOCH_END_PREFIX}1.1"] >= 1.0

    wait_for(beat_a_second_after_the_epoch, 60, interval=0.1, what="a heartbeat a second after the epoch")
    epoch_end_1 = trials()[1].user_attrs[f"{EPOCH_END_PREFIX}1.1"]
    time.sleep(max(0.0, epoch_end_1 + 1.0 - time.time()))  # a second of trial 1's steps after its epoch
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    study = optuna.load_study(study_name="dead", storage=open_storage(storage))
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert [len(t.user_attrs[ATTEMPTS_ATTR]) for t in running] == [1, 1]
    assert all(t.user_attrs[ATTEMPTS_ATTR][0]["outcome"] == "running" for t in running)
    assert [r["epoch"] for r in study_status(study)["running"]] == [1, 1]
    beats = [float(t.user_attrs[HEARTBEAT_ATTR]) for t in running]
    ends = [t.user_attrs[f"{EPOCH_END_PREFIX}1.1"] for t in running]
    assert beats[1] < ends[1] < killed_at < beats[1] + 6  # the field condition: no beat after trial 1's epoch

    # Silent for longer than its grace period: status flags it (the sweep has not run yet).
    doc = study_status(study, now=beats[1] + 13)
    assert [(r["stale"], r["grace_s"]) for r in doc["running"]] == [(True, 2), (True, 12)]
    assert "STALE, past the grace period of 12 s" in render_text(doc)
    assert [r["stale"] for r in study_status(study, now=beats[1] + 0.5)["running"]] == [False, False]

    assert recovery.sweep_stale_journal_trials(study, grace_period=2, max_retry=3, now=beats[1] + 13) == [0, 1]
    doc = study_status(study)
    for number, interval in enumerate((1, 6)):
        dead = doc["trials"][number]
        (attempt,) = dead["attempts"]
        assert dead["state"] == "FAIL" and dead["cause"] == "dead_worker" and attempt["outcome"] == "dead"
        # Alive at its last beat or epoch, dead before the beat that never came: the middle of that window.
        assert attempt["end"] == (max(beats[number], ends[number]) + beats[number] + interval) / 2
        lost = doc["tasks"][f"node/worker-{7 + number}"]["lost_s"]
        assert lost == pytest.approx(attempt["end"] - ends[number], abs=1e-3) and lost > 0
        assert abs(lost - (killed_at - ends[number])) <= interval  # the steps' time, within the interval
    assert doc["compute"]["lost_dead_s"] == pytest.approx(sum(t["lost_s"] for t in doc["tasks"].values()), abs=1e-2)
    assert doc["failed"]["by_cause"]["dead_worker"]["trials"] == [0, 1]
    # Lineage both ways: the retry names the dead trial, the study names the retry.
    (retry,) = [t for t in study.get_trials() if retried_from(t) == 0]
    assert study.user_attrs[f"{RETRIED_BY_PREFIX}0"] == retry.number and doc["trials"][0]["retried_by"] == retry.number
    assert doc["retries"][0]["trial"] == retry.number and doc["retries"][0]["dead_task"] == "node/worker-7"
    assert doc["waiting"][0] == {"trial": retry.number, "kind": "retry", "since": None, "paused_by": None,
                                 "retry_of": 0, "rerun_of": None, "checkpoint_dir": None}
    assert accounting.work_left(study.get_trials(), max_trials=2) == 2  # the retries still need a worker
    assert not math.isnan(doc["compute"]["spent_s"])
