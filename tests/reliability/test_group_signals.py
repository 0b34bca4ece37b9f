"""Stop signals as a scheduler sends them: to every process of the process group at once, with the
default ``num_workers=2`` (DataLoader workers included), as ``kill -TERM -- -<pgid>``, ``timeout`` and
SLURM's requeue/preemption/time limit do. The run or trial must pause, not fail, and resume with each
epoch logged exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.tags import PARENT_RUN_ATTR, PAUSED_BY_ATTR, RUN_ATTR, WORKER_ATTR
from deepsports.train.loop import EPOCH_METRICS
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TINY, TUNE_SPACE, as_args, deepsports_cmd, local_env, tiny_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)
EPOCHS = 4


@pytest.fixture(scope="module")
def cache_dir(tiny_cache_dir) -> Path:
    return tiny_cache_dir


def _env(uri: str) -> dict[str, str]:
    return local_env(uri, OMP_NUM_THREADS="1")


def _loader_workers(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _signal_group_when(proc: subprocess.Popen, ready, sig: int, timeout_s: float = 120) -> None:
    """Send ``sig`` to the whole process group of ``proc`` once ``ready()`` is true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, sig)
            return
        time.sleep(0.05)
    proc.kill()
    _out, err = proc.communicate()
    pytest.fail(f"the process never got ready for the signal (exit {proc.returncode}):\n{err[-6000:]}")


def _each_epoch_once(client: MlflowClient, run_id: str) -> None:
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)


def test_train_with_loader_workers_pauses_on_a_group_signal_and_resumes(tmp_path, cache_dir, store_uri):
    """SIGTERM, then (the same command resumed) SIGUSR1, each to the whole group: each pauses the run."""
    uri = store_uri
    ckpt = tmp_path / "ckpt"
    values = tiny_overrides(tmp_path, epochs=EPOCHS, checkpoint_dir=ckpt, evaluate="false")
    values.update(cache_dir=str(cache_dir), num_workers="2")  # the default: two DataLoader worker processes
    cmd = deepsports_cmd("train", *as_args(values))
    client = MlflowClient(uri)
    run_ids = []
    # Mid-training with its loader workers alive: after an epoch's checkpoint (the first, then one the resumed
    # process wrote), workers running; EPOCHS leaves epochs to train after each.
    for sig, epoch in ((signal.SIGTERM, 1), (signal.SIGUSR1, 2)):
        proc = subprocess.Popen(cmd, env=_env(uri), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        _signal_group_when(proc, lambda proc=proc, epoch=epoch: (ckpt / f"epoch-{epoch:04d}.pt").exists()
                           and len(_loader_workers(proc.pid)) >= 2, sig)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 75, (sig, err[-6000:])
        assert "DataLoader worker" not in err and "Traceback" not in err, (sig, err[-6000:])
        (run,) = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
        assert run.info.status == "KILLED" and run.data.tags["deepsports.interrupted"] == "true", sig
        run_ids.append(run.info.run_id)
    assert run_ids[0] == run_ids[1]  # the first pause was resumed, not restarted as a second run

    again = subprocess.run(cmd, env=_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-6000:]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    _each_epoch_once(client, run.info.run_id)


def test_tune_workers_pause_on_a_group_sigterm_and_the_same_command_resumes_them(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "study.journal")
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    settings = {**TINY, "cache_dir": str(cache_dir), "epochs": EPOCHS, "evaluate": "false", "num_workers": 2}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    cmd = deepsports_cmd("tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage, "--workers", "2",
                         "--max-trials", "2", "--pruner", "none", "--seed", "0", *sets)
    proc = subprocess.Popen(cmd, env=_env(uri), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)

    def both_training() -> bool:
        try:
            running = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except (KeyError, ValueError):  # not created yet
            return False
        pids = [int(t.user_attrs[WORKER_ATTR].split()[0].rsplit(":", 1)[1]) for t in running
                if t.intermediate_values and WORKER_ATTR in t.user_attrs]
        return len(pids) == 2 and all(len(_loader_workers(pid)) >= 2 for pid in pids)

    _signal_group_when(proc, both_training, signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-6000:]
    assert "DataLoader worker" not in err, err[-6000:]
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    paused = study.get_trials(deepcopy=False)
    assert [t.state for t in paused] == [TrialState.WAITING] * 2 and all(PAUSED_BY_ATTR in t.user_attrs for t in paused)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    assert MlflowClient(uri).get_run(parent).info.status == "KILLED"  # no worker alive, paused work left

    again = subprocess.run(cmd, env=_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-6000:]
    client = MlflowClient(uri)
    trials = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert client.get_run(parent).info.status == "FINISHED"
    for trial in trials:
        assert client.get_run(trial.user_attrs[RUN_ATTR]).info.status == "FINISHED"
        _each_epoch_once(client, trial.user_attrs[RUN_ATTR])
