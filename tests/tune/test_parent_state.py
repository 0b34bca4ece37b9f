"""A study's MLflow parent run follows the study (deepsports.tune.parent): RUNNING only while a worker is alive,
else what the trials say, however the last worker stopped (a data error, Ctrl-C), and a parent left stale is
settled by the next ``deepsports status``, run from another folder."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from deepsports.errors import ConfigError
from deepsports.tags import (
    CONFIG_ATTR,
    HEARTBEAT_ATTR,
    PARENT_RUN_ATTR,
    PARENT_STATE_ATTR,
    RUN_ATTR,
    TRACKING_URI_ATTR,
)
from deepsports.tune.parent import check_same_store, parent_state, store_label, study_store
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TINY, TUNE_SPACE, deepsports_cmd, local_env

optuna.logging.set_verbosity(optuna.logging.WARNING)
GRACE = 120.0


def _trial(state: TrialState, ended_s_ago: float | None = None, beat_s_ago: float | None = None):
    now = time.time()
    trial = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                         params={"x": 0.1}, distributions={"x": FloatDistribution(0, 1)},
                         user_attrs={} if beat_s_ago is None else {HEARTBEAT_ATTR: now - beat_s_ago})
    trial.datetime_start = dt.datetime.fromtimestamp(now - 1000)
    if ended_s_ago is not None:
        trial.datetime_complete = dt.datetime.fromtimestamp(now - ended_s_ago)
    return trial


def test_the_parent_state_is_what_the_workers_and_trials_say():
    done, failed = _trial(TrialState.COMPLETE, 50), _trial(TrialState.FAIL, 10)
    live, dead = _trial(TrialState.RUNNING, beat_s_ago=5), _trial(TrialState.RUNNING, beat_s_ago=GRACE + 5)
    assert parent_state([done, live], 4, GRACE) == "RUNNING"          # a worker beats
    assert parent_state([done, dead], 4, GRACE) == "KILLED"           # its worker died: the retry is work left
    assert parent_state([done, _trial(TrialState.WAITING)], None, GRACE) == "KILLED"   # paused (Ctrl-C, SIGTERM)
    assert parent_state([done, failed], 4, GRACE) == "FAILED"         # stopped short on an error
    assert parent_state([failed, _trial(TrialState.COMPLETE, 5)], 4, GRACE) == "KILLED"  # stopped short, no error
    assert parent_state([done, failed], 2, GRACE) == "FINISHED"       # max_trials reached
    assert parent_state([failed], None, GRACE) == "FAILED"            # nothing ever completed
    assert parent_state([done, failed], None, GRACE) == "FINISHED"


def test_the_study_names_its_store_and_a_worker_or_reader_elsewhere_is_told_which_to_set(tmp_path, monkeypatch):
    study = optuna.create_study(direction="maximize")  # in memory: only its attributes matter here
    assert store_label("postgresql://alice:pw@db/mlflow") == "postgresql://alice:***@db/mlflow"
    monkeypatch.chdir(tmp_path)
    assert store_label("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"  # from any folder
    study.set_user_attr(TRACKING_URI_ATTR, "sqlite:////a/mlflow.db")
    with pytest.raises(ConfigError, match=r"logs to the MLflow store sqlite:////a/mlflow.db, but this worker's is "
                                          r"sqlite:////b/mlflow.db: set MLFLOW_TRACKING_URI=sqlite:////a/mlflow.db "):
        check_same_store(study, "sqlite:////b/mlflow.db")
    study.set_user_attr(TRACKING_URI_ATTR, "postgresql://alice:***@db/mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(ConfigError, match=r"set MLFLOW_TRACKING_URI=postgresql://alice:\*\*\*@db/mlflow "
                                          r"\(with its credentials\)"):
        study_store(study)  # a reader cannot use a redacted password: it says what to set
    assert list(tmp_path.iterdir()) == []  # and opened (created) no store


def _tune_cmd(tmp_path: Path, storage: str, *sets: str) -> list[str]:
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    return deepsports_cmd("tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage, "--n-trials", "1",
                          "--pruner", "none", *[arg for item in sets for arg in ("--set", item)])


def _env(uri: str) -> dict[str, str]:
    return local_env(uri, OMP_NUM_THREADS="1")


def _parent(storage: str, uri: str):
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    return study, MlflowClient(uri).get_run(study.user_attrs[PARENT_RUN_ATTR])


def test_a_worker_stopped_by_a_data_error_ends_the_parent_failed_and_status_settles_a_stale_one(tmp_path, store_uri):
    storage = str(tmp_path / "study.journal")
    missing = tmp_path / "no-videos"
    missing.mkdir()
    settings = {**TINY, "cache_dir": str(tmp_path / "cache"), "dataset": "mtl_aqa", "root_dir": str(missing)}
    cmd = _tune_cmd(tmp_path, storage, *(f"{k}={v}" for k, v in settings.items() if k != "learning_rate"))
    proc = subprocess.run(cmd, env=_env(store_uri), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("deepsports: error:")
    study, parent = _parent(storage, store_uri)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
    assert parent.info.status == "FAILED"
    assert study.user_attrs[TRACKING_URI_ATTR] == store_uri  # absolute already: recorded as given

    # A worker killed too abruptly to settle it (SIGKILL) leaves it RUNNING: the next reader settles it, from any
    # folder, with no store of its own (MLFLOW_TRACKING_URI unset) and without creating one there.
    client = MlflowClient(store_uri)
    client.update_run(parent.info.run_id, status="RUNNING")  # as a worker SIGKILLed mid-trial leaves it ...
    study.set_user_attr(PARENT_STATE_ATTR, "RUNNING")  # ... and its record in the study
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(store_uri)
    env.pop("MLFLOW_TRACKING_URI")
    status = subprocess.run(deepsports_cmd("status", "s", "--storage", storage), env=env, cwd=elsewhere,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-4000:]
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    assert study.user_attrs[PARENT_STATE_ATTR] == "FAILED"  # the next `status` need not open MLflow
    assert list(elsewhere.iterdir()) == []


def test_ctrl_c_to_a_lone_worker_pauses_its_trial_and_ends_the_parent_killed(tmp_path, store_uri, tiny_cache_dir):
    storage = str(tmp_path / "study.journal")
    settings = {**TINY, "epochs": 40, "evaluate": "false"}  # the cache from $DEEPSPORTS_CACHE_DIR
    cmd = _tune_cmd(tmp_path, storage, *(f"{k}={v}" for k, v in settings.items() if k != "learning_rate"))
    work = tmp_path / "work"  # a folder of its own: the runs' artifacts go beside the store, not here
    work.mkdir()
    env = {**_env(store_uri), "DEEPSPORTS_CACHE_DIR": str(tiny_cache_dir)}
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)

    def training() -> bool:  # a trial that logged an epoch: Ctrl-C lands mid-training
        try:
            study = optuna.load_study(study_name="s", storage=open_storage(storage))
        except (KeyError, ValueError):
            return False
        return any(RUN_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    deadline = time.monotonic() + 180
    while not training() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-4000:]
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the foreground process group
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    study, parent = _parent(storage, store_uri)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]  # paused, resumable
    assert parent.info.status == study.user_attrs[PARENT_STATE_ATTR] == "KILLED"
    assert parent.info.artifact_uri.removeprefix("file://").startswith(str(tmp_path / "mlruns" / "deepsports"))
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints"]  # the trial's, as documented; no mlruns/
    # What is recorded is the cache that was used: the trial's config, the run's tag and its config.yaml.
    (trial,) = study.get_trials()
    client = MlflowClient(store_uri)
    run = client.get_run(trial.user_attrs[RUN_ATTR])
    assert trial.user_attrs[CONFIG_ATTR]["cache_dir"] == run.data.tags["deepsports.config.cache_dir"] \
        == str(tiny_cache_dir)
    logged = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert f"cache_dir: {tiny_cache_dir}\n" in logged
