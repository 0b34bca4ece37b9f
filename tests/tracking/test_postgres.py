"""A lab's set-up, for real: PostgreSQL (deploy/postgres-local.sh) behind an MLflow tracking server
(deploy/mlflow-server.sh), and a 2-worker study whose trials land in Optuna on the same PostgreSQL.

Nothing may be lost between the two stores, and the database password may appear in no run, no
study attribute and no log. Needs root on a Debian machine with apt access the first time (the
script installs `postgresql`); CI installs it before the tests (.ci/run).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.config import LOCATION_KEYS, config_fields
from deepsports.tags import PARENT_RUN_ATTR, REASON_ATTR, RUN_ATTR
from deepsports.train.loop import EPOCH_METRICS
from tests.e2e_helpers import REPO, deepsports_cmd, free_port, run_checked, subprocess_env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DEPLOY = REPO / "deploy"
MAX_TRIALS = 4
EPOCHS = 2
SPACE = """\
fixed: {epochs: 2}
params:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  activation: {type: categorical, choices: [none, relu, gelu]}
"""


def _script(name: str, command: str, env: dict[str, str], timeout: float = 600) -> str:
    """Run deploy/<name> <command>; its stdout (the scripts print URLs with the password as ***)."""
    proc = subprocess.run([str(DEPLOY / name), command], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"deploy/{name} {command} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _run_url(db: str, env: dict[str, str]) -> str:
    proc = subprocess.run([str(DEPLOY / "postgres-local.sh"), "url", db], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def postgres():
    """A cluster of its own on a free port, started by deploy/postgres-local.sh and stopped at the end.

    Its state lives under /var/tmp, not pytest's tmp: run as root, the server runs as the `postgres`
    user, who cannot enter root's 0700 pytest directories. The password holds characters that need
    quoting in SQL and percent-encoding in URLs.
    """
    state = Path(tempfile.mkdtemp(prefix="deepsports-pg-test-", dir="/var/tmp"))
    secret_core = secrets.token_hex(12)
    env = dict(os.environ, DEEPSPORTS_PG_DIR=str(state), DEEPSPORTS_PG_PORT=str(free_port()),
               DEEPSPORTS_PG_PASSWORD=f"{secret_core}'%:@")
    try:
        out = _script("postgres-local.sh", "start", env)
        assert secret_core not in out and "***@127.0.0.1" in out
        urls = {db: _run_url(db, env) for db in ("mlflow", "optuna")}
        yield {"env": env, "state": state, "secret": secret_core, "urls": urls, "port": env["DEEPSPORTS_PG_PORT"]}
    finally:
        stopped = subprocess.run([str(DEPLOY / "postgres-local.sh"), "stop"], env=env, capture_output=True, text=True)
        shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """deploy/mlflow-server.sh on a free port: the `mlflow` database, artifacts proxied to a local directory."""
    state = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = dict(postgres["env"], DEEPSPORTS_MLFLOW_DIR=str(state), DEEPSPORTS_MLFLOW_PORT=str(port),
               DEEPSPORTS_MLFLOW_WORKERS="2")
    try:
        out = _script("mlflow-server.sh", "start", env)
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in out
        yield {"uri": f"http://127.0.0.1:{port}", "state": state, "env": env}
    finally:
        stopped = subprocess.run([str(DEPLOY / "mlflow-server.sh"), "stop"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr


def test_the_server_listens_on_loopback_only_and_wants_the_password(postgres):
    import psutil
    import sqlalchemy

    pid = int((postgres["state"] / "postgres.pid").read_text())
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", int(postgres["port"]))}

    for db, url in postgres["urls"].items():
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(sqlalchemy.text("select current_database(), current_user")).one() == (
                db, "deepsports")
        engine.dispose()
    wrong = postgres["urls"]["optuna"].replace(postgres["secret"], "0" * len(postgres["secret"]))
    engine = sqlalchemy.create_engine(wrong)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        engine.connect()
    engine.dispose()
    status = _script("postgres-local.sh", "status", postgres["env"])
    assert f"127.0.0.1:{postgres['port']}" in status and postgres["secret"] not in status


@pytest.fixture(scope="module")
def study(postgres, tracking_server, tmp_path_factory, tiny_cache_dir):
    """`deepsports tune --workers 2` with Optuna on PostgreSQL and MLflow through the server."""
    tmp_path = tmp_path_factory.mktemp("pg-study")
    # The clip cache is made before the workers start (the session's, as a lab's `deepsports prepare` would).
    cache = tiny_cache_dir
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(SPACE))
    overrides = dict(synth_clips=40, frame_num=4, spatial_size=32, embed_dim=32, epochs=EPOCHS, num_workers=0,
                     log_model="false", evaluate="false", cache_dir=str(cache))
    name = f"pg-{secrets.token_hex(4)}"
    storage = postgres["urls"]["optuna"]
    cmd = deepsports_cmd("tune", str(space), "--study", name, "--workers", "2", "--storage", storage,
                         "--max-trials", str(MAX_TRIALS))
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    proc = run_checked(cmd, subprocess_env(tracking_server["uri"], OMP_NUM_THREADS="1"), cwd=tmp_path)
    loaded = optuna.load_study(study_name=name, storage=storage)
    return {"name": name, "study": loaded, "client": MlflowClient(tracking_server["uri"]), "tmp": tmp_path,
            "output": proc.stdout + proc.stderr}


def _trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if not t.user_attrs.get(REASON_ATTR, "").startswith("not run")]


def test_optuna_holds_exactly_max_trials_finished_trials(study):
    trials = study["study"].trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none duplicated
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    trained = _trained(study["study"])
    assert [t.number for t in trained] == list(range(MAX_TRIALS))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trained), [t.state for t in trained]
    # Two workers may ask for the last slot at once: the loser is recorded FAIL and never trained.
    assert all(t.state == TrialState.FAIL and t.number >= MAX_TRIALS for t in trials if t not in trained)


def test_each_trial_has_one_child_run_under_the_single_parent(study):
    client, optuna_study = study["client"], study["study"]
    parent_id = optuna_study.user_attrs[PARENT_RUN_ATTR]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    parents = client.search_runs([parent.info.experiment_id],
                                 filter_string=f"tags.`optuna.study_name` = '{study['name']}' and "
                                               "tags.`deepsports.kind` = 'study'")
    assert [r.info.run_id for r in parents] == [parent_id]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_number: dict[int, list] = {}
    for run in children:
        by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    trained = _trained(optuna_study)
    assert sorted(by_number) == [t.number for t in trained]
    for trial in trained:
        (run,) = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR]
        assert run.info.status == ("FINISHED" if trial.state == TrialState.COMPLETE else "KILLED")


def test_each_child_has_one_point_per_epoch_and_its_params(study):
    client = study["client"]
    for trial in _trained(study["study"]):
        run = client.get_run(trial.user_attrs[RUN_ATTR])
        epochs_run = len(trial.intermediate_values)
        assert epochs_run == EPOCHS or trial.state == TrialState.PRUNED
        for key in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs_run + 1)), (trial.number, key, steps)
        # The value Optuna judged each epoch by is the one MLflow holds.
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_spearman")}
        assert logged.keys() == trial.intermediate_values.keys()
        for step, value in trial.intermediate_values.items():
            assert math.isclose(logged[step], value, rel_tol=1e-6, abs_tol=1e-9), (trial.number, step)
        params = run.data.params
        # Every hyperparameter is a param; the location keys are tags (deepsports.config.<key>).
        assert set(config_fields()) - set(LOCATION_KEYS) <= set(params) and not set(LOCATION_KEYS) & set(params)
        assert {f"deepsports.config.{key}" for key in LOCATION_KEYS} <= set(run.data.tags)
        assert math.isclose(float(params["learning_rate"]), trial.params["learning_rate"], rel_tol=1e-6)
        assert params["activation"] == trial.params["activation"]
        assert params["epochs"] == str(EPOCHS) and params["frame_num"] == "4"


def test_artifacts_are_served_by_the_tracking_server(study, tracking_server, tmp_path):
    client = study["client"]
    trial = _trained(study["study"])[0]
    run = client.get_run(trial.user_attrs[RUN_ATTR])
    # Proxied artifacts: clients upload and download through the server, not a shared file system.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    path = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    config = yaml.safe_load(path.read_text())
    assert config["frame_num"] == 4 and math.isclose(config["learning_rate"], trial.params["learning_rate"])
    stored = list((tracking_server["state"] / "artifacts").rglob(f"{run.info.run_id}/artifacts/config.yaml"))
    assert len(stored) == 1 and stored[0].read_bytes() == path.read_bytes()


def test_the_database_password_is_in_no_run_attribute_or_log(study, postgres, tracking_server):
    secret, client, optuna_study = postgres["secret"], study["client"], study["study"]
    parent = client.get_run(optuna_study.user_attrs[PARENT_RUN_ATTR])
    runs = [parent] + [client.get_run(t.user_attrs[RUN_ATTR]) for t in _trained(optuna_study)]
    shown = f"postgresql://deepsports:***@127.0.0.1:{postgres['port']}/optuna"
    assert parent.data.tags["optuna.storage"] == shown
    for run in runs:
        for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
            leaked = [key for key, value in values.items() if secret in value]
            assert not leaked, (run.info.run_name, kind, leaked)
        if "optuna.storage" in run.data.tags:
            assert run.data.tags["optuna.storage"] == shown
    attrs = [optuna_study.user_attrs] + [a for t in optuna_study.trials for a in (t.user_attrs, t.system_attrs)]
    assert secret not in json.dumps(attrs, default=str)
    assert secret not in study["output"]
    logs = [tracking_server["state"] / "mlflow-server.log", postgres["state"] / "log" / "postgres.log"]
    for log_file in logs:
        assert secret not in log_file.read_text(errors="replace"), log_file
