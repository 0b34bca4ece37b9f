"""Exact resume in a study (issue #22): a seeded study (one worker at a time, a fixed median pruner)
whose trials are paused by signals and picked up by the next worker, and whose worker is killed
(its trial retried by the next worker), reaches the trial values, pruned/complete states and best
trial of the same study never interrupted.

Every worker is a fresh process (``tests/reliability/resume_worker.py --tune``, forked as in
``tests/reliability/forked_attempts.py``) that signals its own process group at the N-th training
step it runs, counted over its trials.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from deepsports.tune.accounting import is_extra, retried_from
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TINY, TUNE_SPACE, copy_store, subprocess_env
from tests.reliability import forked_attempts

pytestmark = pytest.mark.slow

HEARTBEAT_S, GRACE_S = 1, 3
#: Pause the first trial mid epoch 1 (SIGTERM), pause again mid-epoch (SIGUSR1), kill the next worker
#: mid-trial (SIGKILL: the trial is retried by the next worker), then a worker that runs to the end.
STOPS = ["step:4:TERM", "step:9:USR1", "step:8:KILL", "-"]


def _settings(directory: Path, cache_dir: Path) -> dict:
    (directory / "space.yaml").write_text(TUNE_SPACE)
    overrides = {k: v for k, v in {**TINY, "cache_dir": str(cache_dir), "epochs": 3, "evaluate": False,
                                   "dropout": "0.3", "system_metrics_interval_s": 0}.items() if k != "learning_rate"}
    return {"search_space": str(directory / "space.yaml"), "study_name": "s", "storage": str(directory / "s.journal"),
            "max_trials": 4, "seed": 0, "pruner": "median", "pruner_startup_trials": 1, "pruner_warmup_epochs": 0,
            "heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S, "checkpoint_root": str(directory / "ckpt"),
            "overrides": overrides, "parent_wait_s": 5.0}


def _workers(directory: Path, uri: str, settings: dict, stops: list[str]) -> list[tuple[str, int, str]]:
    """One worker per stop, one after another (after a SIGKILL, once the dead trial's heartbeat is stale)."""
    done = []
    for i, stop in enumerate(stops):
        codes, err = forked_attempts.run([stop, "--tune", json.dumps(settings)],
                                         subprocess_env(uri, OMP_NUM_THREADS="1"), directory, directory / f"worker-{i}.log")
        done.append((stop, codes[0], err))
        if stop.endswith("KILL"):
            time.sleep(GRACE_S + 2 * HEARTBEAT_S)
    return done


def _outcomes(storage: str) -> tuple[list[tuple], tuple]:
    """Each original trial in order: params, final state, value, intermediate values (a killed trial's are
    its retry's); and the best trial's params and value."""
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    retry_of = {retried_from(t): t for t in trials if retried_from(t) is not None}
    rows = []
    for trial in sorted((t for t in trials if not is_extra(t)), key=lambda t: t.number):
        final = trial
        while final.state == TrialState.FAIL and final.number in retry_of:
            final = retry_of[final.number]
        rows.append((trial.params, final.state, final.value, dict(final.intermediate_values)))
    best = study.best_trial
    return rows, (best.params, best.value)


def test_a_paused_and_killed_study_reaches_the_uninterrupted_studys_trials(tmp_path, tiny_cache_dir, migrated_store):
    dirs = {name: tmp_path / name for name in ("uninterrupted", "interrupted")}
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for name, directory in dirs.items():
            directory.mkdir()
            settings = _settings(directory, tiny_cache_dir)
            jobs[name] = pool.submit(_workers, directory, copy_store(migrated_store, directory), settings,
                                     ["-"] if name == "uninterrupted" else STOPS)
    [(_, code, err)] = jobs["uninterrupted"].result()
    assert code == 0, err
    attempts = jobs["interrupted"].result()
    assert [code for _stop, code, _err in attempts] == [75, 75, -9, 0], attempts

    expected, expected_best = _outcomes(str(dirs["uninterrupted"] / "s.journal"))
    got, best = _outcomes(str(dirs["interrupted"] / "s.journal"))
    study = optuna.load_study(study_name="s", storage=open_storage(str(dirs["interrupted"] / "s.journal")))
    assert any(retried_from(t) is not None for t in study.trials), "the killed worker's trial was retried"
    assert len(got) == len(expected) == 4
    for row, want in zip(got, expected):
        assert row == want
    assert best == expected_best
    states = sorted(str(row[1]) for row in expected)
    print(f"\n[exact-resume] study: {len(expected)} trials ({', '.join(states)}) after 2 pauses and a killed worker "
          f"== the uninterrupted study; best {expected_best[1]}")
