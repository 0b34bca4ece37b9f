"""The rough edges a new user hits (issue #13), through the real ``deepsports`` command in a subprocess:
bad input exits 2 with one line naming the value, where it came from and what is allowed, and
creates nothing; a one-epoch smoke run works with the defaults."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e_helpers import TINY, as_args, deepsports_cmd, subprocess_env


def run(cwd: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(deepsports_cmd(*args), env=subprocess_env(f"sqlite:///{cwd / 'mlflow.db'}", **env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The one error line of a refused command (exit 2, nothing on stdout, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------------------------
# Item 7: one epoch with the defaults; conflicting values say where each came from
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_one_epoch_smoke_run_works_with_the_default_warmup(tmp_path, tiny_cache_dir):
    # The shared clip cache (the demo test below makes its own from nothing); the store is new.
    tiny = {k: v for k, v in TINY.items() if k != "warmup_epochs"}  # the default warm-up (1 epoch)
    proc = run(tmp_path, "train", "epochs=1", "evaluate=false", f"cache_dir={tiny_cache_dir}", *as_args(tiny))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["best_epoch"] == 1 and summary["run_id"]
    # Item 11: the UI opens the experiment on its runs; paths are tags, the params are what runs differ by.
    from mlflow.tracking import MlflowClient

    from deepsports.config import LOCATION_KEYS

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(summary["run_id"])
    assert client.get_experiment(logged.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert not set(LOCATION_KEYS) & set(logged.data.params) and {"epochs", "learning_rate"} <= set(logged.data.params)
    assert logged.data.tags["deepsports.config.cache_dir"] == str(tiny_cache_dir)
    assert (tmp_path / "checkpoints" / summary["run_id"] / "best.pt").is_file()  # in the working directory


def test_a_conflict_names_where_each_value_came_from(tmp_path):
    experiment = tmp_path / "short.yaml"
    experiment.write_text("epochs: 2\n")
    before = files_in(tmp_path)
    refused(run(tmp_path, "train", "--config", str(experiment), "warmup_epochs=3"),
            "warmup_epochs=3", "epochs=2", "warmup_epochs from the command line", f"epochs from {experiment}",
            "warmup_epochs <= epochs")
    # A value the file does not set is not blamed on it.
    refused(run(tmp_path, "config", "--config", str(experiment), "spatial_size=100"),
            "spatial_size=100", "patch_size=16", "spatial_size from the command line", "patch_size from the defaults")
    assert files_in(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Item 8: the same boolean spellings everywhere; no non-finite numbers
# --------------------------------------------------------------------------------------------

def test_every_boolean_key_takes_the_same_spellings(tmp_path):
    proc = run(tmp_path, "config", "freeze=on", "gpu=off", "data_aug=yes", "normalize=No", "evaluate=0",
               "--amsgrad", "ON")
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert [values[k] for k in ("freeze", "gpu", "data_aug", "normalize", "amsgrad", "evaluate")] == \
        ["true", "false", "true", "false", "true", "false"]
    refused(run(tmp_path, "config", "freeze=maybe"), "freeze='maybe'", "the command line", "yes/no, on/off")


def test_non_finite_numbers_are_refused_up_front(tmp_path):
    refused(run(tmp_path, "train", "learning_rate=inf"), "learning_rate='inf'", "the command line",
            "not a finite number", "expected a number >= 0")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("key, value", [("learning_rate", "-inf"), ("weight_decay", "nan"), ("momentum", "1e999"),
                                        ("dropout", "0.1,inf"), ("loss_mse_weight", float("inf"))])
def test_the_parser_refuses_every_non_finite_spelling(key, value):
    from deepsports.config import parse_value
    from deepsports.errors import ConfigError

    with pytest.raises(ConfigError, match="not a finite number"):
        parse_value(key, value)


# --------------------------------------------------------------------------------------------
# Items 4 and 6: tune checks --set and the study name before anything exists
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (("--set", "epochs=ten"), ("--set", "epochs='ten'", "an integer >= 1")),
    (("--set", "epochs=-1"), ("--set", "epochs='-1'", "an integer >= 1")),
    (("--set", "warmup_epochs=5"), ("with --set", "warmup_epochs=5 is longer than the run (epochs=2)")),
    (("--set", "learning_rate=0.1"), ("--set learning_rate", "samples it")),
    (("--workers", "2", "--set", "epochs=ten"), ("--set", "epochs='ten'")),
], ids=["type", "range", "relation", "sampled", "workers"])
def test_tune_refuses_a_bad_set_before_any_trial(tmp_path, args, needles):
    refused(run(tmp_path, "tune", "demo", "--study", "s", *args), *needles)
    assert files_in(tmp_path) == []  # no journal, no MLflow store, no checkpoint folder


@pytest.mark.parametrize("command", [("tune", "demo", "--study", "../../esc"), ("best", "../esc"),  # path-scan: not a path
                                     ("tune", "demo", "--study", "a/b"), ("tune", "demo", "--study", ".hidden")])
def test_study_names_are_one_safe_path_component(tmp_path, command):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    refused(run(work, *command), "is not a valid study name", "letters, digits, '.', '_' or '-'")
    assert files_in(tmp_path) == ["a", "a/b"]


@pytest.mark.slow
def test_a_worker_whose_trials_fail_alike_stops_instead_of_spinning(tmp_path, tiny_cache_dir):
    """Every trial fails the same way (its pretrained checkpoint is missing): the worker stops after a few
    trials, with that reason and its exit code, although no trial limit was given."""
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    tiny = {k: v for k, v in TINY.items() if k != "learning_rate"}
    sets = [a for k, v in {**tiny, "cache_dir": tiny_cache_dir, "epochs": 1,
                           "pretrained_model": tmp_path / "missing.pt"}.items() for a in ("--set", f"{k}={v}")]
    proc = run(tmp_path, "tune", str(space), "--study", "s", "--storage", str(tmp_path / "s.journal"), *sets)
    assert proc.returncode == 4 and "failed alike, stopping" in proc.stderr and "missing.pt" in proc.stderr, \
        proc.stderr[-3000:]
    import optuna

    from deepsports.tune.study import open_storage
    from deepsports.tune.worker import SAME_FAILURES_STOP

    trials = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / "s.journal"))).trials
    assert [t.state.name for t in trials] == ["FAIL"] * SAME_FAILURES_STOP


# --------------------------------------------------------------------------------------------
# Item 5: submit checks everything it can know before sbatch
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job, needles", [
    (("tune", "--", "nospace", "--study", "s"), ("search space file 'nospace' does not exist", "demo, head")),
    (("tune", "--", "demo"), ("submit tune: the job's arguments after --", "--study")),
    (("tune", "--", "demo", "--study", "../x"), ("'../x' is not a valid study name",)),  # path-scan: not a path
    (("tune", "--", "demo", "--study", "s", "--set", "epochs=ten"), ("--set", "epochs='ten'")),
    (("tune", "--storage", "redis://h/0", "--", "demo", "--study", "s"), ("submit --storage", "'redis'", "sqlite://")),
    (("tune", "--", "demo", "--study", "s", "--storage", "sqlite:///no/such/dir/x.db"), ("--storage after --",
                                                                                         "does not exist")),
    (("train", "--", "epochs=ten"), ("epochs='ten'", "the command line")),
    (("train", "--", "--bogus", "1"), ("submit train: the job's arguments after --", "--bogus")),
], ids=["space", "no-study", "study-name", "set", "storage-scheme", "storage-dir", "train-config", "train-flag"])
def test_submit_checks_the_job_before_sbatch(tmp_path, job, needles):
    # No sbatch on PATH: were the job not refused first, submit would fail differently (exit 7).
    refused(run(tmp_path, "submit", job[0], "--profile", "local", *job[1:], PATH="/usr/bin:/bin"), *needles)
    assert files_in(tmp_path) == []


def test_submit_prints_what_it_resolved_and_warns_without_a_time_limit(tmp_path, slurm_cluster):
    profile = tmp_path / "notime.yaml"
    profile.write_text("partition: debug\nenv:\n  MLFLOW_TRACKING_URI: sqlite:///$SLURM_SUBMIT_DIR/mlflow.db\n")
    proc = run(tmp_path, "submit", "tune", "--profile", str(profile), "--array-size", "1", "--", "demo", "--study", "s",
               "--n-trials", "1")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("submitted tune job ")[1].split()[0]
    subprocess.run(["scancel", job_id], check=False)  # the job itself is not what this test is about
    assert f"study storage: {tmp_path / 'optuna-journal.log'} (the default: no --storage given)" in proc.stdout
    assert f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path}/mlflow.db deepsports ui" in proc.stdout
    assert "$SLURM_SUBMIT_DIR" not in proc.stdout and f"tail -f {tmp_path}/slurm-logs/" in proc.stdout
    assert "sets no `time`" in proc.stderr and "USR1" in proc.stderr


# --------------------------------------------------------------------------------------------
# Item 9: named files work from any directory
# --------------------------------------------------------------------------------------------

def test_named_configs_search_spaces_and_profiles_work_from_any_directory(tmp_path):
    proc = run(tmp_path, "config", "--config", "experiments/demo.yaml")
    assert proc.returncode == 0 and "synth_clips: 600" in proc.stdout, proc.stderr
    assert run(tmp_path, "config", "--config", "seed_best", "root_dir=/data").returncode == 0
    script = run(tmp_path, "submit", "tune", "--profile", "local", "--dry-run", "--", "head", "--study", "s")
    assert script.returncode == 0 and "#SBATCH --partition=debug" in script.stdout, script.stderr
    assert "exec env --block-signal=USR1 --block-signal=TERM python -m deepsports.cli tune head --study s" in script.stdout
    # A file of the same name here wins over the shipped one.
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "demo.yaml").write_text("epochs: 3\n")
    assert "epochs: 3" in run(tmp_path, "config", "--config", "demo").stdout
    refused(run(tmp_path, "config", "--config", "nosuch"), "config file 'nosuch' does not exist",
            "demo, original_defaults, seed_best")


# --------------------------------------------------------------------------------------------
# Item 13: --version, every exit code in --help and the README
# --------------------------------------------------------------------------------------------

def _error_types():
    import deepsports.errors
    from deepsports.slurm.jobs import SlurmError

    found = [t for t in vars(deepsports.errors).values() if isinstance(t, type) and issubclass(t, Exception)]
    return [*found, SlurmError]


def test_version_and_every_exit_code_in_help_and_readme(tmp_path):
    from importlib.metadata import PackageNotFoundError, version

    from deepsports import __version__
    from deepsports.cli.main import EXIT_CODES
    from tests.e2e_helpers import REPO

    proc = run(tmp_path, "--version")
    try:
        expected = version("deepsports")
    except PackageNotFoundError:
        expected = __version__
    assert proc.returncode == 0 and proc.stdout.strip() == f"deepsports {expected}", proc
    codes = dict(EXIT_CODES)
    assert {t.exit_code for t in _error_types()} | {0, 1, 130} == set(codes)  # each error type has its line
    help_text = run(tmp_path, "--help").stdout
    readme = (REPO / "README.md").read_text()
    for code in codes:
        assert f"  {code:>3}  {codes[code]}" in help_text, code
        assert f"| {code} |" in readme, code
    assert files_in(tmp_path) == []


def test_the_console_script_names_a_function():
    import importlib

    import tomllib

    from tests.e2e_helpers import REPO

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["deepsports"]
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert getattr(importlib.import_module(module), name).__module__ == module  # not a submodule of the same name


# --------------------------------------------------------------------------------------------
# Items 9 and 10: `deepsports demo` from another directory: its store and checkpoints land there, and
# its output has no warning
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_demo_from_another_directory_keeps_its_run_there_and_prints_no_warning(tmp_path):
    from tests.e2e_helpers import REPO

    repo_store = REPO / "mlflow.db"
    before = repo_store.stat().st_mtime_ns if repo_store.exists() else None
    params = [a for k, v in {**TINY, "evaluate": "true", "cache_dir": tmp_path / "cache"}.items()
              for a in ("-P", f"{k}={v}")]
    proc = run(tmp_path, "demo", "--epochs", "1", *params, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "run id:" in proc.stdout and "test Spearman:" in proc.stdout
    # The one warning left is the documented CPU fallback of gpu=true on a machine without CUDA.
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "WARNING" in line and "no CUDA device is available" not in line]
    assert warnings == [] and "was logged as" not in proc.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [logged] = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
    assert logged.info.status == "FINISHED" and proc.stdout.count(logged.info.run_id) >= 1
    assert (tmp_path / "checkpoints" / logged.info.run_id / "best.pt").is_file()
    assert (repo_store.stat().st_mtime_ns if repo_store.exists() else None) == before
    assert not (REPO / "checkpoints" / logged.info.run_id).exists()
