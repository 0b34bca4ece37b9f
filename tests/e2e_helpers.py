"""Shared settings for end-to-end tests: a tiny model on a tiny synthetic set, all under tmp_path."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON_BIN = Path(sys.executable).parent

#: A model and dataset small enough that an epoch takes a second or two on 2 CPU cores.
TINY = {
    "synth_clips": 40,
    "frame_num": 4,
    "spatial_size": 32,
    "patch_size": 16,
    "embed_dim": 32,
    "topology": "32",
    "dropout": "0.1",
    "batch_size": 4,
    "num_workers": 0,
    "learning_rate": 1e-3,
    "warmup_epochs": 0,
    "log_model": "false",
}


#: A two-parameter search space for study tests (trials differ, every config is valid).
TUNE_SPACE = """\
params:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  activation: {type: categorical, choices: [none, relu, gelu]}
"""


def tiny_overrides(tmp_path: Path, **changes) -> dict[str, str]:
    values = {**TINY, "cache_dir": str(tmp_path / "cache"), **changes}
    return {k: str(v) for k, v in values.items()}


def as_args(values: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def subprocess_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1",
               PATH=f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    env.pop("MLFLOW_RUN_ID", None)
    env.update(extra)
    return env


def local_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """:func:`subprocess_env` of a command started by hand on this machine: no ``SLURM_*`` variable, even when the
    tests themselves run inside a SLURM job (the command would take itself for a task of that job)."""
    return {k: v for k, v in subprocess_env(tracking_uri, **extra).items() if not k.startswith("SLURM_")}


def deepsports_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepsports.cli", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def copy_store(migrated_store: Path, directory: Path) -> str:
    """Copy the session's migrated MLflow store (conftest ``migrated_store``) to ``directory/mlflow.db``; its URI."""
    target = directory / "mlflow.db"
    shutil.copyfile(migrated_store, target)
    return f"sqlite:///{target}"


def run_checked(cmd: list[str], env: dict[str, str], cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-8000:]}")
    return proc
