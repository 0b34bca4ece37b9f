"""Bad input through the command line: one clear error naming the file/key/value, a non-zero exit code,
no traceback, and nothing half-written. Plus property-based tests of the config and search-space parsers.

Most cases call :func:`deepsports.cli.main` in this process (the same code path as the console script,
minus the ~5 s interpreter start); the cases about argparse, exit codes and tracebacks run the real
``python -m deepsports.cli`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsports.cli.main import main
from deepsports.config import build_config, config_fields, format_value, parse_value
from deepsports.data.cache import is_temp_file
from deepsports.data.safe_pickle import restricted_load
from deepsports.errors import ConfigError, SearchSpaceError
from deepsports.tune.search_space import load_search_space
from tests.e2e_helpers import REPO, TINY, deepsports_cmd, subprocess_env

SYNTH_CLIPS = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from deepsports.data.synth import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("bad-input") / "synth", n_clips=SYNTH_CLIPS, seed=0,
                                      progress=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return tmp_path


def _cli(*args: str) -> tuple[int, str]:
    """Exit code and stderr of ``deepsports ARGS`` run in this process (an uncaught exception fails the test)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr  # one clear error
    return lines[0]


def _copy(dataset, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset.root, root)
    return root


def _prepare(tmp_path: Path, root: Path, **paths: Path) -> tuple[int, str]:
    values = {"dataset": "mtl_aqa", "root_dir": root, "annotation_path": root / "final_annotations_dict.pkl",
              "train_path": root / "train_split_0.pkl", "test_path": root / "test_split_0.pkl",
              "cache_dir": tmp_path / "cache", "spatial_size": 32, "frame_num": 4, **paths}
    return _cli("prepare", "--quiet", *(f"{k}={v}" for k, v in values.items()))


def _assert_nothing_half_written(tmp_path: Path) -> None:
    temps = [p for p in tmp_path.rglob("*") if is_temp_file(p) or p.name.startswith(".tmp-")]
    assert not temps, temps


def _first_video(root: Path) -> Path:
    return sorted((root / "whole_videos").iterdir())[0]


# --------------------------------------------------------------------------------------------
# Videos, annotations, splits (`deepsports prepare`, exit code 3 = DataError)
# --------------------------------------------------------------------------------------------

def _missing(video: Path) -> None:
    video.unlink()


def _corrupt(video: Path) -> None:
    video.write_bytes(b"\x00not a video\xff" * 200)


def _truncated(video: Path) -> None:
    data = video.read_bytes()
    video.write_bytes(data[:len(data) // 3])


@pytest.mark.parametrize("damage, expected", [(_missing, "does not exist"), (_corrupt, "corrupt or not a video"),
                                              (_truncated, "corrupt or not a video")])
def test_a_bad_video_is_one_error_naming_file_video_and_clip(dataset, workdir, damage, expected):
    root = _copy(dataset, workdir)
    video = _first_video(root)
    damage(video)
    code, stderr = _prepare(workdir, root)
    line = _error_line(stderr)
    assert code == 3 and expected in line and str(video) in line and "clip" in line, stderr
    assert "Traceback" not in stderr
    _assert_nothing_half_written(workdir)


def _rewrite_annotations(root: Path, change) -> Path:
    path = root / "final_annotations_dict.pkl"
    annotations = dict(restricted_load(path))
    first = sorted(annotations)[0]
    record = dict(annotations[first])
    change(record)
    annotations[first] = record
    path.write_bytes(pickle.dumps(annotations))
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.update(end_frame=10**6), r"clip 1 needs frames \d+\.\.1000000 but video '.*01\.mp4' has only \d+"),
    (lambda r: r.pop("difficulty"), r"final_annotations_dict\.pkl: clip \(1, 1\): missing field\(s\) difficulty"),
    (lambda r: r.update(final_score="high"), r"final_annotations_dict\.pkl: clip \(1, 1\): field 'final_score'='high' "
                                             r"is invalid: expected a finite number"),
], ids=["clip-outside-video", "missing-field", "wrong-type"])
def test_bad_annotations_are_one_error_naming_file_clip_and_field(dataset, workdir, change, expected):
    root = _copy(dataset, workdir)
    _rewrite_annotations(root, change)
    code, stderr = _prepare(workdir, root)
    assert code == 3, stderr
    assert __import__("re").search(expected, _error_line(stderr)), stderr
    _assert_nothing_half_written(workdir)


@pytest.mark.parametrize("split, expected", [([(99, 1)], "1 clip(s) are not in the annotations: (99, 1)"),
                                             ([], "the split is empty")], ids=["unknown-clip", "empty"])
def test_bad_splits_are_one_error_naming_the_file(dataset, workdir, split, expected):
    root = _copy(dataset, workdir)
    path = root / "bad_split.pkl"
    path.write_bytes(pickle.dumps(split))
    code, stderr = _prepare(workdir, root, train_path=path)
    assert code == 3 and f"{path}: {expected}" in _error_line(stderr), stderr
    assert not (workdir / "cache").exists() or not any((workdir / "cache").rglob("*.npy"))


# --------------------------------------------------------------------------------------------
# Config files, search spaces, flags (exit code 2 = ConfigError), before anything is written
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("epochz: 3\n", "unknown config key 'epochz' in {path}; did you mean epochs?"),
    ("epochs: three\n", "{path}: epochs='three' is invalid: expected an integer >= 1"),
    ("epochs: -3\n", "{path}: epochs=-3 is invalid: expected an integer >= 1"),
    ("learning_rate: [1, 2]\n", "{path}: learning_rate="),
], ids=["unknown-key", "wrong-type", "out-of-range", "list-for-scalar"])
def test_bad_config_file_fails_before_any_run_or_file_exists(workdir, text, expected):
    path = workdir / "bad.yaml"
    path.write_text(text)
    code, stderr = _cli("train", "--config", str(path))
    assert code == 2 and expected.format(path=path) in _error_line(stderr), stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"]  # no mlflow.db, checkpoints/ or cache


@pytest.mark.parametrize("params, expected", [
    ("  learning_rat: {type: float, low: 0.001, high: 0.1}", "unknown config key 'learning_rat' in search space {path}"),
    ("  learning_rate: {type: float, low: abc, high: 0.1}", "{path}: params.learning_rate.low: 'abc' is not a finite number"),
    ("  learning_rate: {type: float, low: 0.1, high: 0.01}", "{path}: params.learning_rate: low=0.1 is greater than high=0.01"),
    ("  epochs: {type: int, low: 0, high: 3}", "{path}: params.epochs"),
], ids=["unknown-key", "wrong-type", "empty-range", "out-of-range"])
def test_bad_search_space_fails_before_any_study_or_run_exists(workdir, params, expected):
    path = workdir / "space.yaml"
    path.write_text(f"params:\n{params}\n")
    code, stderr = _cli("tune", str(path), "--study", "s", "--storage", str(workdir / "study.journal"))
    assert code == 2 and expected.format(path=path) in _error_line(stderr), stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["space.yaml"]


@pytest.mark.parametrize("args, expected", [
    (("train", "--epochs", "abc"), "epochs='abc' is invalid: expected an integer >= 1"),
    (("train", "batch_size=0"), "batch_size='0' is invalid"),
    (("train", "--gpu", "maybe"), "gpu='maybe' is invalid: expected a boolean (true/false, yes/no, on/off, 1/0)"),
    (("train", "nokey=1"), "unknown config key 'nokey' in overrides"),
    (("tune", "head", "--study", "s", "--n-trials", "-3"), "argument --n-trials: '-3': expected a whole number >= 0"),
    (("tune", "head", "--study", "s", "--pruner", "bogus"), "argument --pruner: invalid choice: 'bogus'"),
    (("tune", "head", "--study", "s", "--workers", "0"), "--workers=0: expected 1 or more"),
], ids=["int", "range", "bool", "unknown-key", "n-trials", "pruner", "workers"])
def test_bad_flag_values_exit_2_with_one_message(workdir, args, expected):
    code, stderr = _cli(*args)
    assert code == 2 and expected in _error_line(stderr), stderr
    assert list(workdir.iterdir()) == []


def test_the_console_command_prints_no_traceback_for_bad_flags(tmp_path):
    for args in (("train", "--epochs", "abc"), ("tune", "head", "--study", "s", "--pruner", "bogus")):
        proc = subprocess.run(deepsports_cmd(*args), env=subprocess_env(f"sqlite:///{tmp_path / 'm.db'}"),
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == "" and "error:" in proc.stderr


# --------------------------------------------------------------------------------------------
# Checkpoints and storages
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_pretrained_checkpoint_of_another_architecture_fails_the_run_with_a_checkpoint_error(workdir):
    import torch
    from mlflow.tracking import MlflowClient

    from deepsports.model import build_model

    tiny = {**TINY, "synth_clips": SYNTH_CLIPS, "cache_dir": str(workdir / "cache"), "evaluate": "false"}
    other = build_model(build_config({**tiny, "backbone": "small"})).model  # 384 wide, 12 deep vs tiny's 192 x 4
    path = workdir / "other.pt"
    torch.save(other.state_dict(), path)
    code, stderr = _cli("train", *(f"{k}={v}" for k, v in {**tiny, "epochs": 1, "pretrained_model": path}.items()))
    line = _error_line(stderr)
    assert code == 4 and f"checkpoint '{path}' does not fit the model (TimeSformer tiny" in line, stderr
    assert "pos_embed: checkpoint [1, 5, 384] vs model [1, 5, 192]" in line, stderr
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["deepsports.failure_reason"].startswith("CheckpointError")


def test_an_unreachable_storage_is_a_storage_error_with_the_password_redacted(workdir):
    code, stderr = _cli("tune", str(REPO / "search_spaces" / "head.yaml"), "--study", "s", "--storage",
                        "postgresql://u:secret@127.0.0.1:1/x")
    line = _error_line(stderr)
    assert code == 6 and "cannot open study storage 'postgresql://u:***@127.0.0.1:1/x'" in line, stderr
    assert "secret" not in stderr


def test_best_of_a_study_that_does_not_exist_names_it_and_the_studies_there(workdir):
    import optuna

    from deepsports.tune.study import open_storage

    storage = workdir / "study.journal"
    optuna.create_study(storage=open_storage(storage), study_name="real")
    for command in ("best", "status"):  # one exit code for one mistake: 2, bad input
        code, stderr = _cli(command, "nope", "--storage", str(storage))
        assert code == 2 and f"no study 'nope' in {storage} (studies there: real)" in _error_line(stderr), stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["study.journal"]  # no experiments/, no mlflow.db


# --------------------------------------------------------------------------------------------
# Property-based: the parsers raise ConfigError and nothing else
# --------------------------------------------------------------------------------------------

_FIELDS = sorted(config_fields())
_ANY_VALUE = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                       st.booleans(), st.none(), st.lists(st.one_of(st.integers(-5, 600), st.floats(-2, 2)), max_size=4),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(_FIELDS), value=_ANY_VALUE)
def test_parse_value_accepts_round_trippable_values_and_rejects_with_config_error(name, value):
    try:
        parsed = parse_value(name, value)
    except ConfigError:
        return
    # Whatever is accepted survives its string form (CLI flags, MLflow params, MLproject).
    assert parse_value(name, format_value(parsed)) == parsed


@settings(max_examples=150, deadline=None)
@given(values=st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=8)), _ANY_VALUE, max_size=5))
def test_build_config_raises_only_config_error(values):
    try:
        config = build_config(values)
    except ConfigError:
        return
    assert build_config({k: format_value(v) for k, v in config.to_dict().items()}) == config


_RANGE = st.fixed_dictionaries({}, optional={"low": _ANY_VALUE, "high": _ANY_VALUE, "log": _ANY_VALUE,
                                             "step": _ANY_VALUE})
_ENTRY = st.one_of(_ANY_VALUE, st.builds(lambda t, r: {"type": t, **r},
                                         st.sampled_from(["float", "int", "categorical", "layers", "per_layer",
                                                          "bogus"]), _RANGE),
                   st.fixed_dictionaries({"type": st.just("categorical"), "choices": _ANY_VALUE}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(["params", "fixed", "description", "base_config", "bogus"]),
                           st.one_of(_ANY_VALUE, st.dictionaries(st.sampled_from(_FIELDS[:12] + ["nokey"]), _ENTRY,
                                                                 max_size=3)), max_size=3))
def test_arbitrary_search_space_files_raise_only_search_space_errors(tmp_path, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_search_space(path)
    except SearchSpaceError:
        pass
    except ConfigError as exc:  # unknown keys are reported by the config layer
        assert str(path) in str(exc) or "search space" in str(exc), exc
