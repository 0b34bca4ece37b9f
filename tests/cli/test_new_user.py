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
def test_a_one_epoch_smoke_run_works_with_the_default_warmup(tmp_path):
    tiny = {k: v for k, v in TINY.items() if k != "warmup_epochs"}  # the default warm-up (1 epoch)
    proc = run(tmp_path, "train", "epochs=1", "evaluate=false", f"cache_dir={tmp_path / 'cache'}", *as_args(tiny))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["best_epoch"] == 1 and summary["run_id"]


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
               "--amsgrad", "Y")
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
    from deepsports.config import ConfigError, parse_value

    with pytest.raises(ConfigError, match="not a finite number"):
        parse_value(key, value)
