"""Signals the way the local SLURM cluster delivers them, with the default ``num_workers`` (two DataLoader
worker processes per trial): ``scontrol requeue`` (SIGTERM to every process of the task),
``scancel --signal=USR1 --batch`` five times in a row on a 4-task array throttled to ``%2`` (each paused
trial, its partial checkpoint and its MLflow run are followed through the requeue: what a single USR1
proves too; that the requeued task itself resumes its trial: tests/slurm/test_slurm_status.py), and
signals that reach the batch shell before Python runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.slurm.jobs import render_script, submit
from deepsports.slurm.profile import build_profile
from deepsports.tags import (
    ATTEMPTS_ATTR,
    CKPT_ATTR,
    PARENT_RUN_ATTR,
    PAUSED_BY_ATTR,
    RESUMED_ATTR,
    RUN_ATTR,
    TASK_ATTR,
    WORKER_ATTR,
)
from deepsports.train.loop import EPOCH_METRICS
from tests.e2e_helpers import REPO
from tests.slurm.test_slurm_tune import _active, _children_by_trial, _study, _submit, _tasks, _wait

pytestmark = pytest.mark.slurm
optuna.logging.set_verbosity(optuna.logging.WARNING)

EARLY_WORKER = """
import json, os, sys, time
out, task = sys.argv[1], os.environ["SLURM_ARRAY_TASK_ID"]
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
if task == "1":
    # Python runs, its handler is not installed yet (the imports of a real worker take 0.3 s to seconds): the
    # signal lands in the window after the batch shell's `trap ''` and the exec.
    open(f"{out}/started_{task}", "w").close()
    deadline = time.time() + 60
    while not os.path.exists(f"{out}/sent_{task}") and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
from deepsports.errors import PreemptedError
from deepsports.slurm.preemption import preemptible

try:
    with preemptible() as stop:  # as every deepsports command: a stop, then requeue or not
        if stop.requested():
            raise PreemptedError("stopped")
except PreemptedError:
    pass
with open(f"{out}/task_{task}_{restart}.json", "w") as f:
    json.dump({"signal": stop.flag.signal_name}, f)
"""


@pytest.fixture(scope="module")
def cache_dir(tiny_cache_dir) -> Path:
    return tiny_cache_dir


def _signal(task: str, name: str, times: int) -> None:
    """``scancel --signal=<name> --batch`` ``times`` times at once (scancel retries while the task is in a
    transitional state, as it does in the field)."""
    procs = [subprocess.Popen(["scancel", f"--signal={name}", "--batch", task], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(times)]
    for proc in procs:
        proc.wait(timeout=120)


def test_signals_before_python_runs_are_kept_and_handed_to_the_worker(slurm_cluster, tmp_path):
    """Task 0: the profile's warning signal (USR2 here: NCCL jobs keep USR1 for NCCL) five times while the batch
    shell sets up, before Python runs: the worker takes it as its time-limit warning and requeues the task.
    Task 1: SIGTERM (not from SLURM's job control: the job stays RUNNING, so no requeue) after the exec, before
    Python's handler exists (the window the template's ``trap ''`` once dropped signals in: now they stay
    blocked, pending, until it does)."""
    (tmp_path / "worker.py").write_text(EARLY_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    profile = build_profile({
        "partition": "debug", "time": "5", "cpus_per_task": 1, "mem": "200M", "grace_seconds": 30,
        "array_size": 2, "array_concurrency": 2, "logdir": str(tmp_path / "logs"), "signal": "USR2",
        # The batch shell's set-up (a venv, modules) before Python runs, here lasting until the template's
        # trap has noted a signal (at most 60 s): the signals land before Python however loaded the machine.
        "setup_lines": ['[ "$SLURM_ARRAY_TASK_ID" = 1 ] || [ "${SLURM_RESTART_COUNT:-0}" != 0 ] || '
                        'for _ in $(seq 600); do [ -n "$deepsports_early_signals" ] && break; sleep 0.1; done'],
        "env": {"PYTHONPATH": str(REPO)}}, "test")
    script = render_script("tune", profile, [sys.executable, str(tmp_path / "worker.py"), str(out)],
                           job_name="test-early")
    assert "#SBATCH --signal=B:USR2@30" in script.splitlines()
    job = submit(script, cwd=tmp_path)
    logs = tmp_path / "logs"
    _wait(lambda: all(t.get("JobState") == "RUNNING" for t in _tasks(job).values()) and len(_tasks(job)) == 2, 60,
          "both tasks to start", job, logs)
    _signal(f"{job}_0", "USR2", 5)
    _wait(lambda: (out / "started_1").exists(), 60, "task 1's Python to start", job, logs)
    _signal(f"{job}_1", "TERM", 1)
    (out / "sent_1").touch()
    _wait(lambda: not _active(job), 120, "the array to finish (task 0 after its requeue)", job, logs)
    tasks = _tasks(job)
    text = "\n".join(p.read_text() for p in logs.glob("*.log"))
    for task, restarts in (("0", "1"), ("1", "0")):  # not FAILED with signal 12 / 15
        assert (tasks[task]["JobState"], tasks[task]["ExitCode"], tasks[task]["Restarts"]) == (
            "COMPLETED", "0:0", restarts), f"{tasks[task]}\n{text}"
    assert json.loads((out / "task_0_0.json").read_text()) == {"signal": "SIGUSR2"}
    assert json.loads((out / "task_0_1.json").read_text()) == {"signal": None}  # the requeued run
    assert json.loads((out / "task_1_0.json").read_text()) == {"signal": "SIGTERM"}
    assert f"requeued SLURM task {job}_0 (stopped by SIGUSR2, the time-limit warning)" in text, text
    assert f"SLURM task {job}_1 stopped by SIGTERM from outside SLURM" in text, text


def _loader_workers(trial) -> int:
    pid = int(trial.user_attrs[WORKER_ATTR].split()[0].rsplit(":", 1)[1])  # "<host>:<pid> slurm ..."
    try:
        return len(psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return 0


def test_requeue_and_a_usr1_storm_on_a_throttled_array_pause_and_resume_trials(slurm_cluster, tmp_path, cache_dir):
    storage, epochs = str(tmp_path / "study.journal"), 5
    job, uri = _submit(tmp_path, cache_dir, storage, array_size=4, concurrency=2, max_trials=4, epochs=epochs,
                       drop=("num_workers",))  # the default, 2 (the tiny settings say 0)
    logs = tmp_path / "logs"

    def two_in_training():
        try:
            running = _study(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (KeyError, ValueError):
            return None
        busy = [t for t in running if t.intermediate_values and TASK_ATTR in t.user_attrs and _loader_workers(t) >= 2]
        return busy if len(busy) == 2 else None

    requeued, stormed = _wait(two_in_training, 180, "two trials training with loader workers", job, logs)
    subprocess.run(["scontrol", "requeue", requeued.user_attrs[TASK_ATTR]], check=True)  # SIGTERM to the task
    _signal(stormed.user_attrs[TASK_ATTR], "USR1", 5)
    _wait(lambda: not _active(job), 420, "the array to finish", job, logs)

    tasks = _tasks(job)
    for victim in (requeued, stormed):
        info = tasks[victim.user_attrs[TASK_ATTR].rsplit("_", 1)[1]]
        assert victim.user_attrs[TASK_ATTR] == f"{job}_{info['ArrayTaskId']}"
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info
        log = (logs / f"t_{job}_{info['ArrayTaskId']}.log").read_text()
        assert "restart 0," in log and "restart 1," in log
    trials = {t.number: t for t in _study(storage).trials}
    assert sorted(trials) == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in trials.values())
    client = MlflowClient(uri)
    text = "\n".join(p.read_text() for p in logs.glob("*.log"))
    for victim in (requeued, stormed):
        trial = trials[victim.number]
        assert trial.params == victim.params and trial.user_attrs[PAUSED_BY_ATTR] == victim.user_attrs[TASK_ATTR]
        # Paused by its task with the partial checkpoint the pause wrote, resumed from that very checkpoint
        # (by whichever task of the array claimed it first) in the same trial and MLflow run.
        paused, resumed = trial.user_attrs[ATTEMPTS_ATTR]
        assert (paused["outcome"], paused["task"], resumed["outcome"]) == ("paused", victim.user_attrs[TASK_ATTR],
                                                                           "complete")
        assert paused["checkpoint_at"] is not None and paused["checkpoint_at"] <= paused["end"] <= resumed["start"]
        partial = Path(trial.user_attrs[RESUMED_ATTR]["checkpoint"])  # partial unless stopped between epochs
        assert partial.parent == Path(trial.user_attrs[CKPT_ATTR]) and re.fullmatch(r"epoch-\d{4}(-partial)?\.pt",
                                                                                      partial.name)
        assert trial.user_attrs[RESUMED_ATTR]["epoch"] >= max(victim.intermediate_values)
        assert f"resuming from {partial}" in text
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        run = client.get_run(trial.user_attrs[RUN_ATTR])
        assert run.info.status == "FINISHED" and run.data.tags["deepsports.resumes"] == "1"
        assert run.data.tags["deepsports.resumed_from"].startswith(partial.name)
        for key in EPOCH_METRICS:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(
                range(1, epochs + 1)), key
    children = _children_by_trial(client, _study(storage).user_attrs[PARENT_RUN_ATTR])
    assert sorted(children) == sorted(trials) and all(len(runs) == 1 for runs in children.values())
    assert sorted(r.info.run_id for runs in children.values() for r in runs) == sorted(
        t.user_attrs[RUN_ATTR] for t in trials.values())
    assert "DataLoader worker" not in text and "Traceback" not in text


#: Seconds within which a worker whose step daemon was SIGKILLed has ended, with its loader workers: the
#: parent-death signal stops it at once (it checkpoints, pauses its trial, requeues its task), a SIGKILL
#: follows 60 s later if it is still running.
STEP_DEATH_S = 30


def test_scancel_ends_tasks_for_good_and_a_dead_step_takes_its_worker_along(slurm_cluster, tmp_path, cache_dir):
    """A plain ``scancel`` of one task, then of the whole array, ends them for good with their trials paused
    (the SIGTERM of a cancel is told from a requeue's by the controller's restart count). ``kill -9`` of a
    task's ``slurmstepd`` leaves no worker outside SLURM and no ghost task holding a slot of the array."""
    storage = str(tmp_path / "study.journal")
    job, _uri = _submit(tmp_path, cache_dir, storage, array_size=2, concurrency=2, max_trials=2, epochs=60,
                        drop=("num_workers",))  # the default, 2 loader workers per trial
    logs = tmp_path / "logs"

    def training(count: int, restart: str = "0"):
        try:
            running = _study(storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except (KeyError, ValueError):
            return None
        busy = [t for t in running if t.intermediate_values and TASK_ATTR in t.user_attrs
                and _tasks(job)[t.user_attrs[TASK_ATTR].rsplit("_", 1)[1]].get("Restarts") == restart
                and _loader_workers(t) >= 2]
        return busy if len(busy) == count else None

    stepped, cancelled = _wait(lambda: training(2), 180, "two trials training", job, logs)
    worker = psutil.Process(int(stepped.user_attrs[WORKER_ATTR].split()[0].rsplit(":", 1)[1]))
    stepd = worker.parent()
    assert stepd.name().startswith("slurmstepd")
    left = [worker, *worker.children(recursive=True)]
    subprocess.run(["scancel", cancelled.user_attrs[TASK_ATTR]], check=True, timeout=60)
    stepd.kill()
    killed = time.monotonic()
    gone, alive = psutil.wait_procs(left, timeout=STEP_DEATH_S)
    assert alive == [] and time.monotonic() - killed < STEP_DEATH_S

    task_of = {t.number: t.user_attrs[TASK_ATTR].rsplit("_", 1)[1] for t in (stepped, cancelled)}
    # The cancelled task ended for good; the dead step's task requeued itself: no ghost RUNNING in its slot.
    _wait(lambda: _tasks(job)[task_of[cancelled.number]]["JobState"] == "CANCELLED", 60, "the cancelled task to end",
          job, logs)
    _wait(lambda: _tasks(job)[task_of[stepped.number]]["Restarts"] == "1", 30, "the dead step's task to requeue",
          job, logs)
    assert _tasks(job)[task_of[cancelled.number]]["Restarts"] == "0"
    # It comes back, resumes a paused trial; then `scancel <array>` ends it for good too.
    (resumed,) = _wait(lambda: training(1, restart="1"), 120, "the requeued task to resume a trial", job, logs)
    assert resumed.user_attrs[TASK_ATTR] == stepped.user_attrs[TASK_ATTR]
    subprocess.run(["scancel", job], check=True, timeout=60)
    _wait(lambda: not _active(job), 60, "the array to end", job, logs)
    tasks = _tasks(job)
    assert {t: (tasks[t]["JobState"], tasks[t]["Restarts"]) for t in task_of.values()} == {
        task_of[stepped.number]: ("CANCELLED", "1"), task_of[cancelled.number]: ("CANCELLED", "0")}
    trials = _study(storage).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.WAITING] * 2 and all(PAUSED_BY_ATTR in t.user_attrs
                                                                         for t in trials)
    text = "\n".join(p.read_text() for p in logs.glob("*.log"))
    said = [line for line in text.splitlines() if "SLURM task" in line]
    assert sum("was cancelled (scancel" in line for line in said) == 2 and "slurmstepd died" in text, said
    assert "Traceback" not in text and not [p for p in psutil.process_iter(["cmdline"])
                                            if storage in " ".join(p.info["cmdline"] or ())]
