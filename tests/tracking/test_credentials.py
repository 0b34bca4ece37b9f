"""Credentials for a tracking server with authentication, handed to jobs as a 0600 file's name; secrets
kept out of job scripts and sbatch's environment; the server script refuses to listen beyond loopback
without authentication (the server itself: tests/multinode/test_field.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from deepsports.errors import ConfigError
from deepsports.slurm.profile import build_profile
from deepsports.tracking.credentials import CREDENTIALS_ENV, load_credentials
from tests.e2e_helpers import REPO, deepsports_cmd, subprocess_env

GOOD = "[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = p:a%s$w0rd=x\n"


def _file(tmp_path, text: str, mode: int):
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_0600_credentials_file_sets_the_client_user_and_password(tmp_path):
    environ = {CREDENTIALS_ENV: str(_file(tmp_path, GOOD, 0o600))}
    assert load_credentials(environ) == "alice"
    assert (environ["MLFLOW_TRACKING_USERNAME"], environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p:a%s$w0rd=x")
    assert load_credentials({}) is None


@pytest.mark.parametrize(("text", "mode", "message"), [
    (GOOD, 0o640, "mode 0640; allowed: readable by its owner only"),
    (GOOD, 0o604, "mode 0604; allowed: readable by its owner only"),
    ("[mlflow]\nmlflow_tracking_username = alice\n", 0o600, "expected a [mlflow] section with"),
    ("user=alice\n", 0o600, "cannot read the credentials file"),
])
def test_a_readable_or_incomplete_credentials_file_is_refused(tmp_path, text, mode, message):
    environ = {CREDENTIALS_ENV: str(_file(tmp_path, text, mode))}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_credentials(environ)
    assert "MLFLOW_TRACKING_PASSWORD" not in environ


def test_the_cli_refuses_a_world_readable_credentials_file_in_one_line(tmp_path):
    path = _file(tmp_path, GOOD, 0o644)
    env = subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}", **{CREDENTIALS_ENV: str(path)})
    proc = subprocess.run(deepsports_cmd("status", "s", "--storage", str(tmp_path / "j.journal")), env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"deepsports: error: {CREDENTIALS_ENV}={path}: the credentials file is mode 0644; allowed: readable by "
        f"its owner only (chmod 600 {path})"]
    assert "p:a%s$w0rd" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("key", ["MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "MLFLOW_TRACKING_TOKEN"])
def test_a_profile_may_not_put_a_secret_into_the_job_script(key):
    with pytest.raises(ConfigError, match=f"'env' = '{key}' is invalid: expected no secrets") as info:
        build_profile({"env": {key: "hunter2-secret"}}, "lab.yaml")
    assert "hunter2" not in str(info.value)


def test_the_server_script_refuses_to_listen_beyond_loopback_without_authentication(tmp_path):
    env = {**os.environ, "DEEPSPORTS_MLFLOW_HOST": "10.77.0.1", "DEEPSPORTS_MLFLOW_AUTH": "none",
           "DEEPSPORTS_MLFLOW_DIR": str(tmp_path / "m")}
    proc = subprocess.run([str(REPO / "deploy" / "mlflow-server.sh"), "start"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "refusing to listen on 10.77.0.1 without authentication" in proc.stderr
    assert not (tmp_path / "m").exists()  # nothing started, nothing written
