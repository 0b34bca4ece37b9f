"""A study whose workers all died, on the real local SLURM cluster (docs/study-faults.md; issue 26 item 3).

Its only trial is RUNNING and its worker was SIGKILLed: nothing is left to sweep it. ``status`` flags it
as past the grace period, ``submit tune --missing`` counts it as work left and submits one task, whose
sweep fails it and runs its retry: the study completes. (Before, ``--missing`` called such a study
complete and submitted nothing, and it could never finish.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from deepsports.cli.main import main
from deepsports.tags import REASON_ATTR, RETRIED_FROM_ATTR
from deepsports.tune import accounting
from deepsports.tune.study import open_storage
from tests.e2e_helpers import PYTHON_BIN, REPO, TINY, TUNE_SPACE, subprocess_env
from tests.slurm.test_slurm_tune import _active, _wait

pytestmark = pytest.mark.slurm
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: A real tune worker of study "f" whose trial hangs in training until the test kills it.
_DOOMED_WORKER = """\
import sys, time
from deepsports.config import parse_overrides
from deepsports.tune.settings import TuneSettings
from deepsports.tune.worker import tune

def training(config, **kwargs):
    print("training", flush=True)
    time.sleep(600)

space, storage, *sets = sys.argv[1:]
tune(TuneSettings(search_space=space, study_name="f", storage=storage, max_trials=1, seed=0, pruner="none",
                  heartbeat_interval=1, grace_period=3, overrides=parse_overrides(sets), parent_wait_s=5.0),
     train_fn=training)
"""


def test_submit_missing_sweeps_a_study_whose_workers_all_died_and_it_completes(slurm_cluster, tmp_path,
                                                                                 tiny_cache_dir, capsys, monkeypatch):
    uri, storage, logs = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "study.journal"), tmp_path / "logs"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    settings = {**TINY, "cache_dir": str(tiny_cache_dir), "epochs": 1, "evaluate": "false"}
    sets = [f"{key}={value}" for key, value in settings.items() if key != "learning_rate"]
    worker = subprocess.Popen([sys.executable, "-c", _DOOMED_WORKER, str(tmp_path / "space.yaml"), storage, *sets],
                              env=subprocess_env(uri), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "training"
    os.kill(worker.pid, signal.SIGKILL)  # the last worker of the study dies: nobody sweeps its trial
    worker.wait()
    study = optuna.load_study(study_name="f", storage=open_storage(storage))
    (trial,) = study.get_trials()
    assert trial.state == TrialState.RUNNING

    import time

    time.sleep(max(0.0, trial.user_attrs["deepsports.heartbeat"] + 3.5 - time.time()))  # past the grace period
    assert main(["status", "f", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert re.search(r"running\s+trial 0 on .*: STALE, past the grace period of 3 s", out), out

    profile = {"partition": "debug", "time": "10", "cpus_per_task": 1, "mem": "2G", "array_size": 4,
               "array_concurrency": 2, "logdir": str(logs), "setup_lines": [f"export PATH={PYTHON_BIN}:$PATH"],
               "env": {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1",
                       "OMP_NUM_THREADS": "1"}}
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    job_args = [str(tmp_path / "space.yaml"), "--study", "f", "--storage", storage, "--max-trials", "1",
                "--heartbeat", "1", "--grace-period", "3", "--pruner", "none", "--seed", "0",
                *[arg for item in sets for arg in ("--set", item)]]
    assert main(["submit", "tune", "--missing", "--profile", str(tmp_path / "profile.yaml"), "--job-name", "f",
                 "--", *job_args]) == 0
    out = capsys.readouterr().out
    assert "trial(s) 0 RUNNING without a heartbeat for more than the grace period (3 s)" in out, out
    job = re.search(r"submitted tune job (\d+)", out).group(1)
    _wait(lambda: not _active(job), 300, "the sweeping task to finish", job, logs)
    (task_log,) = logs.glob(f"f_{job}*.log")  # one task: the study's only work left

    study = optuna.load_study(study_name="f", storage=open_storage(storage))
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and "stopped beating" in dead.user_attrs[REASON_ATTR], task_log.read_text()
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[RETRIED_FROM_ATTR] == 0, task_log.read_text()
    assert retry.params == dead.params
    assert accounting.work_left(study.get_trials(), max_trials=1) == 0  # complete: --missing submits nothing now
