"""The lab on the simulated multi-node cluster (deploy/slurm-cluster.sh): a login node (the host, on the
bridge address) running PostgreSQL and an MLflow server with authentication, compute nodes node1..node3
reaching them over the network.

Brought up once for tests/multinode (package scope: the tests after it find this process's environment as it
was) and shared by every scenario; scenarios submit their jobs at once (see
test_field.py) so that their waits overlap.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e_helpers import REPO, free_port

CLUSTER = REPO / "deploy" / "slurm-cluster.sh"
STATE = Path("/var/lib/deepsports-cluster")
CONF = STATE / "slurm.conf"
LOGIN = "10.77.0.1"
#: The login node's second address on the bridge, for the MLflow server alone: a node can be cut off from
#: the tracking server (a route) while it still reaches slurmctld and PostgreSQL on LOGIN.
TRACKING_ADDR = "10.77.0.2"
#: The nodes the scenarios share; node4 is the one taken off the network (nothing else runs there).
NODES = ("node1", "node2", "node3")
FAILING_NODE = "node4"


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="package")
def multinode_cluster() -> dict[str, str]:
    """The 4-node cluster (``up`` is idempotent: a running one is used as it is); the environment for its
    commands (``SLURM_CONF``). `.ci/run` brings it up before the tests and down after them."""
    _run([str(CLUSTER), "up", "--nodes", "4"])
    return {**os.environ, "SLURM_CONF": str(CONF)}


@dataclass(frozen=True)
class Lab:
    """The login node's services, and the accounts of the lab's users."""

    env: dict[str, str]          # SLURM_CONF, PGPASSFILE for this process's commands
    tracking_uri: str            # http://10.77.0.1:<port>
    pg_dir: Path
    optuna_url: str              # postgresql://deepsports@10.77.0.1:<port>/optuna: no password (PGPASSFILE)
    mlflow_dir: Path
    users: dict[str, str]        # user -> password (alice runs the studies; bob is another lab member)
    admin_password: str
    credentials: dict[str, Path]  # user -> its 0600 MLflow credentials file

    def client(self, user: str = "alice"):
        """An MlflowClient of ``user`` (credentials in this process's environment)."""
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = self.users[user] if user != "admin" else self.admin_password
        return MlflowClient(self.tracking_uri)


def _mlflow_program(directory: Path) -> str:
    """The mlflow program of this interpreter (a venv made with --system-site-packages has none of its own)."""
    beside = Path(sys.executable).parent / "mlflow"
    if beside.exists():
        return str(beside)
    wrapper = directory / "mlflow-program"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m mlflow "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(scope="package")
def lab(multinode_cluster, tmp_path_factory) -> Lab:
    """PostgreSQL and the MLflow server (basic auth, runs in PostgreSQL, artifacts proxied) on the login node's
    cluster address, each on a free port with its own state; stopped after the last test of tests/multinode."""
    base = Path("/var/tmp") / f"deepsports-multinode-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    (base / "mlflow").mkdir(parents=True)
    secrets_dir = tmp_path_factory.mktemp("secrets")
    users = {"alice": "alice-" + secrets.token_hex(12), "bob": "bob-" + secrets.token_hex(12)}
    users_file = secrets_dir / "users"
    users_file.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    users_file.chmod(0o600)
    credentials = {}
    for user, password in users.items():
        path = secrets_dir / f"{user}.credentials"
        path.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
        path.chmod(0o600)
        credentials[user] = path
    pg_env = {**multinode_cluster, "DEEPSPORTS_PG_DIR": str(base / "pg"), "DEEPSPORTS_PG_PORT": str(free_port()),
              "DEEPSPORTS_PG_HOST": LOGIN}
    mlflow_port = free_port()
    subprocess.run(["ip", "addr", "replace", f"{TRACKING_ADDR}/24", "dev", "dsc-br0"], check=True)
    ml_env = {**pg_env, "DEEPSPORTS_MLFLOW_DIR": str(base / "mlflow"), "DEEPSPORTS_MLFLOW_HOST": TRACKING_ADDR,
              "DEEPSPORTS_MLFLOW_PORT": str(mlflow_port), "DEEPSPORTS_MLFLOW_WORKERS": "2",
              "DEEPSPORTS_MLFLOW_USERS_FILE": str(users_file),
              "DEEPSPORTS_MLFLOW_BIN": _mlflow_program(base)}
    saved = {k: os.environ.get(k) for k in ("PGPASSFILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                             "MLFLOW_TRACKING_URI")}
    try:
        _run([str(REPO / "deploy" / "postgres-local.sh"), "start"], pg_env)
        _run([str(REPO / "deploy" / "mlflow-server.sh"), "start"], ml_env)
        optuna_url = _run([str(REPO / "deploy" / "postgres-local.sh"), "url", "optuna", "--no-password"], pg_env).strip()
        os.environ["PGPASSFILE"] = str(base / "pg" / "pgpass")
        os.environ["MLFLOW_TRACKING_URI"] = f"http://{TRACKING_ADDR}:{mlflow_port}"
        yield Lab(env={**multinode_cluster, "PGPASSFILE": str(base / "pg" / "pgpass")},
                  tracking_uri=f"http://{TRACKING_ADDR}:{mlflow_port}", pg_dir=base / "pg", optuna_url=optuna_url,
                  mlflow_dir=base / "mlflow", users=users,
                  admin_password=(base / "mlflow" / "admin-password").read_text().strip(), credentials=credentials)
    finally:
        subprocess.run([str(REPO / "deploy" / "mlflow-server.sh"), "stop"], env=ml_env, capture_output=True, timeout=120)
        subprocess.run([str(REPO / "deploy" / "postgres-local.sh"), "stop"], env=pg_env, capture_output=True, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["ip", "addr", "del", f"{TRACKING_ADDR}/24", "dev", "dsc-br0"], capture_output=True)
