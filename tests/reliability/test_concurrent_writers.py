"""Many processes writing one store at once: nothing lost, nothing duplicated, no lock error escapes.

8 writer processes log through :class:`deepsports.tracking.RunTracker` to one ``sqlite:///`` MLflow
store; 8 processes run short Optuna trials on one journal file and on one SQLite file; and
``deepsports tune --workers 2`` trains real (tiny) trials into one study and one MLflow store.
The figures printed here (``pytest -s``) are the ones quoted in docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.tags import PARENT_RUN_ATTR, RUN_ATTR
from deepsports.tune.study import open_storage
from tests.e2e_helpers import REPO, deepsports_cmd, subprocess_env

pytestmark = pytest.mark.slow

N_WORKERS = 8
STEPS, N_METRICS, N_PARAMS = 200, 5, 20
TRIALS_PER_WORKER = 10
#: What must never reach a worker's stderr: lock errors are retried inside the tracking/storage code.
ESCAPES = ("database is locked", "Traceback", "StorageError", "OperationalError")


def _run_workers(cmds: list[list[str]], env: dict[str, str], cwd: Path, timeout: float = 420) -> list[dict]:
    """Start every command at once; return their JSON lines after checking exit codes and stderr."""
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    results = []
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-6000:]
        escaped = [text for text in ESCAPES if text in err]
        assert not escaped, err[-6000:]
        results.append({**json.loads(out.strip().splitlines()[-1]), "retries": err.count("retrying in")})
    return results


def _worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.reliability.workers", *map(str, args)]


def test_eight_mlflow_writers_lose_and_duplicate_no_point(tmp_path):
    # A fresh store: the eight processes also race to create MLflow's schema.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tick = time.perf_counter()
    results = _run_workers([_worker_cmd("mlflow", uri, worker, "--steps", STEPS, "--metrics", N_METRICS,
                                        "--params", N_PARAMS) for worker in range(N_WORKERS)],
                           subprocess_env(uri, OMP_NUM_THREADS="1"), tmp_path)
    seconds = time.perf_counter() - tick

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(r["run_id"] for r in results)
    found_points = found_params = 0
    for run in runs:
        worker = int(run.data.tags["writer"])
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"p{j}": f"{worker}-{j}" for j in range(N_PARAMS)}
        found_params += len(run.data.params)
        for k in range(N_METRICS):
            for key, expected in ((f"m{k}", [worker + s / 1000 + k for s in range(STEPS)]),
                                  (f"b{k}", [worker - s / 1000 - k for s in range(STEPS)])):
                history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
                # Exactly the steps logged, each once, with the value logged at that step.
                assert [m.step for m in history] == list(range(STEPS)), key
                assert [m.value for m in history] == pytest.approx(expected), key
                found_points += len(history)
    written = sum(r["points"] for r in results)
    assert found_points == written and found_params == N_WORKERS * N_PARAMS
    print(f"\n[reliability] mlflow sqlite: writers={N_WORKERS} points_written={written} points_found={found_points} "
          f"params={found_params} lost=0 duplicated=0 errors=0 retries={sum(r['retries'] for r in results)} "
          f"seconds={seconds:.1f} (slowest writer {max(r['seconds'] for r in results):.1f} s)")


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_eight_optuna_workers_get_unique_trials(tmp_path, kind):
    storage = str(tmp_path / "study.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    tick = time.perf_counter()
    results = _run_workers([_worker_cmd("optuna", storage, "s", "--trials", TRIALS_PER_WORKER)
                            for _ in range(N_WORKERS)], subprocess_env("sqlite:///unused.db", OMP_NUM_THREADS="1"),
                           tmp_path)
    seconds = time.perf_counter() - tick

    total = N_WORKERS * TRIALS_PER_WORKER
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    assert len(optuna.get_all_study_names(open_storage(storage))) == 1  # one study, however many creators raced
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(total))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Every trial was run by exactly one worker, and each worker ran its n_trials.
    claimed = [n for r in results for n in r["trials"]]
    assert sorted(claimed) == list(range(total))
    assert all(len(r["trials"]) == TRIALS_PER_WORKER for r in results)
    print(f"\n[reliability] optuna {kind}: workers={N_WORKERS} trials_written={total} trials_found={len(trials)} "
          f"unique_numbers={len({t.number for t in trials})} running=0 errors=0 seconds={seconds:.1f}")


def test_tune_cli_with_two_local_workers_trains_each_trial_once(tmp_path, tiny_cache_dir):
    """``deepsports tune --workers 2``: two processes on one journal study and one MLflow store, real training."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The session's clip cache (the same synthetic clips and frame size): the writers under test are the stores'.
    sets = {"synth_clips": 40, "frame_num": 4, "spatial_size": 32, "embed_dim": 32, "epochs": 2, "num_workers": 0,
            "log_model": "false", "evaluate": "false", "cache_dir": tiny_cache_dir,
            "checkpoint_dir": tmp_path / "ckpt"}
    storage = tmp_path / "study.journal"
    cmd = deepsports_cmd("tune", str(REPO / "search_spaces" / "demo.yaml"), "--study", "demo", "--storage",
                         str(storage), "--workers", "2", "--n-trials", "2", "--max-trials", "4", "--pruner", "none")
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, env=subprocess_env(uri, OMP_NUM_THREADS="1"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=420)
    seconds = time.perf_counter() - tick
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert not [text for text in ESCAPES if text in proc.stderr], proc.stderr[-6000:]

    study = optuna.load_study(study_name="demo", storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["deepsports.worker"] for t in trials}
    assert len(workers) == 2  # both processes trained

    client = MlflowClient(uri)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    assert client.get_run(parent).info.status == "FINISHED"
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ATTR] for t in trials)
    for run in children:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_spearman")) == [1, 2]
    print(f"\n[reliability] tune --workers 2: trials=4 complete=4 child_runs={len(children)} seconds={seconds:.1f}")
