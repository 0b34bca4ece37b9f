"""Field conditions of issue #25 met through the real CLI: what a new user and a cluster user ran into.

Unwritable folders (a real read-only mount; a permission the process lacks), a store or study storage in a
folder that does not exist, ``$DEEPSPORTS_CACHE_DIR`` provenance, duplicated keys, one-line errors that
come before torch and MLflow load, and progress bars in log files. Each refusal is one line, exit 2, and
leaves no run, store or folder behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e_helpers import deepsports_cmd, subprocess_env


def _cli(args: list[str], env: dict[str, str], cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *deepsports_cmd(*args)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepsports: error: "), proc.stderr
    return lines[0]


def _no_runs(uri: str) -> None:
    client = MlflowClient(uri)
    assert [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only mount (a bind mount remounted ro: root cannot write there either)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_cache_dir_is_refused_before_any_run(tmp_path, store_uri, read_only_folder):
    env = subprocess_env(store_uri, DEEPSPORTS_CACHE_DIR=str(read_only_folder / "cache"))
    for args in (["train"], ["prepare"]):
        proc = _cli(args, env, tmp_path)
        assert proc.returncode == 2, proc.stderr
        line = _one_error_line(proc)
        assert f"cache_dir '{read_only_folder / 'cache'}' (from $DEEPSPORTS_CACHE_DIR) is not writable: " \
               f"{read_only_folder}: Read-only file system" in line, line
    _no_runs(store_uri)


def test_a_checkpoint_dir_without_write_permission_is_refused_before_any_run(tmp_path, store_uri):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # Root ignores permissions: drop the capabilities that let it, as an ordinary cluster user has none.
    no_override = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
    env = subprocess_env(store_uri, DEEPSPORTS_CACHE_DIR=str(tmp_path / "cache"))
    proc = _cli(["train", f"checkpoint_dir={locked / 'run1'}"], env, tmp_path, prefix=no_override)
    assert proc.returncode == 2, proc.stderr
    assert f"checkpoint_dir '{locked / 'run1'}' is not writable: {locked}: Permission denied" \
        in _one_error_line(proc)
    (tmp_path / "space.yaml").write_text("params:\n  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2}\n")
    tune = _cli(["tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", str(tmp_path / "s.journal"),
                 "--set", f"checkpoint_dir={locked}"], env, tmp_path, prefix=no_override)
    assert tune.returncode == 2 and "the trials' checkpoint_dir" in _one_error_line(tune), tune.stderr
    assert not (tmp_path / "s.journal").exists() and not (tmp_path / "cache").exists()
    _no_runs(store_uri)


def test_a_store_or_storage_in_a_missing_folder_is_refused_and_nothing_is_created(tmp_path):
    typo = tmp_path / "sharde"  # a typo of a shared folder
    env = subprocess_env(f"sqlite:///{typo / 'mlflow.db'}", DEEPSPORTS_CACHE_DIR=str(tmp_path / "cache"))
    proc = _cli(["train"], env, tmp_path)
    assert proc.returncode == 2 and f"the folder '{typo}' does not exist" in _one_error_line(proc), proc.stderr
    (tmp_path / "space.yaml").write_text("params:\n  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2}\n")
    env = subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}", DEEPSPORTS_CACHE_DIR=str(tmp_path / "cache"))
    tune = _cli(["tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", str(typo / "s.journal")], env,
                tmp_path)
    assert tune.returncode == 2 and f"the folder '{typo}' does not exist" in _one_error_line(tune), tune.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_deepsports_cache_dir_is_the_cache_dir_shown(tmp_path):
    env = subprocess_env("sqlite:///unused.db", DEEPSPORTS_CACHE_DIR=str(tmp_path / "scratch"))
    shown = _cli(["config"], env, tmp_path)
    assert shown.returncode == 0 and f"cache_dir: {tmp_path / 'scratch'}\n" in shown.stdout, shown.stderr
    explicit = _cli(["config", "cache_dir=/data/c"], env, tmp_path)  # an explicit value wins over the variable
    assert "cache_dir: /data/c\n" in explicit.stdout


def test_one_key_as_key_value_and_as_flag_is_refused(tmp_path):
    proc = _cli(["config", "epochs=3", "--epochs", "5"], subprocess_env("sqlite:///unused.db"), tmp_path)
    assert proc.returncode == 2
    assert "epochs is given twice on the command line, as epochs=3 and --epochs 5" in _one_error_line(proc)
    same_style = _cli(["config", "epochs=3", "epochs=4", "--batch_size", "2", "--batch_size", "3"],
                      subprocess_env("sqlite:///unused.db"), tmp_path)
    assert "epochs: 4\n" in same_style.stdout and "batch_size: 3\n" in same_style.stdout  # the later one wins


@pytest.mark.parametrize("args, env, message", [
    (["evaluate", "no-such-run"], {}, "is neither a checkpoint file or directory nor an MLflow run id"),
    (["train"], {"MLFLOW_TRACKING_URI": "sqlit:///mlflow.db"}, "MLFLOW_TRACKING_URI=sqlit:///mlflow.db: unknown scheme"),
    (["evaluate", "0" * 32], {"MLFLOW_TRACKING_URI": "htps://mlflow.example"}, "unknown scheme 'htps'"),
])
def test_one_line_errors_come_before_torch_and_mlflow_load(tmp_path, args, env, message):
    """Measured on the 2-core machine under load: `evaluate no-such-run` 11.9 s before, 0.26 s after."""
    cmd = deepsports_cmd(*args)
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=subprocess_env("sqlite:///unused.db", **env),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    timings = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert not {"torch", "mlflow", "optuna"} & {line.rsplit("|", 1)[1].strip() for line in timings}
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_stay_out_of_log_files(tmp_path):
    log = tmp_path / "job.log"
    with open(log, "w") as handle:  # as SLURM or `2> job.log` gives it: not a terminal
        proc = subprocess.run(deepsports_cmd("synth", "--out", str(tmp_path / "synth"), "--clips", "8"),
                              env=subprocess_env("sqlite:///unused.db"), cwd=tmp_path, stdout=handle,
                              stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()
    assert "\r" not in log.read_text()

