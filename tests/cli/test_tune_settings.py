"""The ``tune`` options defined once (TuneSettings): the CLI flags and the MLproject's ``tune`` parameters agree with it."""

from __future__ import annotations

import ast
import dataclasses
import shlex
import subprocess
from pathlib import Path

import yaml

from deepsports.cli.main import build_parser
from deepsports.cli.mlproject import render_mlproject
from deepsports.cli.studies import _tune_settings
from deepsports.tune.settings import DEFAULT_STORAGE, STORAGE_ENV, TuneSettings, tune_options
from tests.e2e_helpers import deepsports_cmd, subprocess_env

REPO = Path(__file__).resolve().parents[2]


def _tune_parser():
    return build_parser()._subparsers._group_actions[0].choices["tune"]


def _parse(argv: list[str]):
    return build_parser().parse_args(["tune", *argv])


def test_every_tune_flag_is_a_settings_field():
    dests = {action.dest for action in _tune_parser()._actions if action.dest != "help"}
    # --workers starts processes and --under-workers tells a started one so: neither is a worker's setting.
    assert dests == set(tune_options()) | {"workers", "under_workers"}
    assert set(tune_options()) <= {f.name for f in dataclasses.fields(TuneSettings)}


def test_flags_build_the_settings_they_name():
    args = _parse(["head", "--study", "s1", "--storage", "x.journal", "--n-trials", "3", "--max-trials", "0",
                   "--timeout", "90", "--pruner", "hyperband", "--seed", "7", "--worker-id", "2", "--heartbeat", "5",
                   "--grace-period", "20", "--max-retry", "1", "--set", "epochs=2", "--set", "frame_num=4"])
    assert _tune_settings(args) == TuneSettings(
        search_space="head", study_name="s1", storage="x.journal", n_trials=3, max_trials=None, timeout=90.0,
        pruner="hyperband", seed=7, worker_id=2, heartbeat_interval=5, grace_period=20, max_retry=1,
        overrides={"epochs": "2", "frame_num": "4"})


def test_repeatable_cause_builds_the_rerun_settings():
    """``--cause`` (kind ``list``) repeats into a tuple of checked names; absent, it is the empty default."""
    args = _parse(["head", "--study", "s1", "--rerun-failed", "--cause", "out-of-memory", "--cause", "dead_worker"])
    settings = _tune_settings(args)
    assert (settings.rerun_failed, settings.rerun_causes) == (True, ("out_of_memory", "dead_worker"))
    assert _tune_settings(_parse(["head", "--study", "s1"])).rerun_causes == ()
    entry = yaml.safe_load(render_mlproject())["entry_points"]["tune"]
    assert not {"rerun_failed", "cause", "rerun_causes"} & set(entry["parameters"])  # one-off re-launches, not params
    assert "--rerun-failed" not in entry["command"] and "--cause" not in entry["command"]


def test_absent_flags_give_the_settings_defaults(monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    settings = _tune_settings(_parse(["head", "--study", "s1"]))
    defaults = {f.name: f.default for f in dataclasses.fields(TuneSettings) if f.default is not dataclasses.MISSING}
    differ = {name for name in tune_options() if name in defaults and getattr(settings, name) != defaults[name]}
    assert differ == {"seed"}  # the CLI seeds the sampler (0) where the library leaves it unseeded (None)
    assert settings.storage == DEFAULT_STORAGE and settings.overrides == {}
    monkeypatch.setenv(STORAGE_ENV, "sqlite:///studies.db")
    assert _tune_settings(_parse(["head", "--study", "s1"])).storage == "sqlite:///studies.db"


def test_mlproject_tune_parameters_are_the_settings_options():
    committed = (REPO / "MLproject").read_text()
    assert committed == render_mlproject(), "MLproject is stale: run `python -m deepsports.cli.mlproject > MLproject`"
    entry = yaml.safe_load(committed)["entry_points"]["tune"]
    with_default = {option.param or name: option for name, option in tune_options().items()
                    if option.project_default is not None}
    assert set(entry["parameters"]) == set(with_default)
    assert {k: v["default"] for k, v in entry["parameters"].items()} == \
        {k: option.project_default for k, option in with_default.items()}
    # The entry point's command, with its defaults filled in, is a valid `deepsports tune` command line.
    command = entry["command"].split("python -m deepsports.cli ", 1)[1]
    argv = shlex.split(command.format(**{k: v["default"] for k, v in entry["parameters"].items()}))
    settings = _tune_settings(build_parser().parse_args(argv))
    assert (settings.search_space, settings.study_name, settings.storage, settings.n_trials) == \
        ("search_spaces/demo.yaml", "demo", DEFAULT_STORAGE, 4)


def test_the_default_journal_name_is_written_once():
    places = []
    for path in sorted((REPO / "deepsports").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == DEFAULT_STORAGE:
                places.append(str(path.relative_to(REPO)))
    assert places == ["deepsports/tune/settings.py"]


def test_tune_and_best_help_name_the_default_storage():
    for command in ("tune", "best"):
        proc = subprocess.run(deepsports_cmd(command, "--help"), capture_output=True, text=True, timeout=60,
                              env=subprocess_env("sqlite:///unused.db", COLUMNS="400"), cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert f"${STORAGE_ENV} or {DEFAULT_STORAGE}" in proc.stdout  # wide COLUMNS: argparse wraps at hyphens
