"""``deepsports evaluate``: the logged test metrics come back exactly from the checkpoint, as a linked run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e_helpers import as_args, copy_store, deepsports_cmd, run_checked, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cache_dir, migrated_store):
    """One tiny run trained by `deepsports train` (evaluate: true) in its own store."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    uri = copy_store(migrated_store, tmp_path)
    values = tiny_overrides(tmp_path, epochs=2, cache_dir=tiny_cache_dir, checkpoint_dir=tmp_path / "ckpt")
    proc = run_checked(deepsports_cmd("train", *as_args(values)), subprocess_env(uri), cwd=tmp_path)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    return tmp_path, uri, summary


def _evaluate(tmp_path: Path, uri: str, *args: str) -> dict:
    proc = run_checked(deepsports_cmd("evaluate", *args), subprocess_env(uri), cwd=tmp_path)
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_evaluate_reproduces_the_logged_test_metrics_exactly(trained):
    tmp_path, uri, summary = trained
    client = MlflowClient(uri)
    source = client.get_run(summary["run_id"])
    logged = {k: v for k, v in source.data.metrics.items() if k.startswith("test_")}
    for key in ("test_spearman", "test_spearman_dd", "test_rel_l2", "test_rel_l2_dd", "test_spearman_ci_low",
                "test_spearman_ci_high", "test_spearman_dd_ci_low", "test_rel_l2_dd_ci_high", "test_loss"):
        assert key in logged, key
    out = _evaluate(tmp_path, uri, summary["run_id"])
    assert out["differs_from_logged"] == {}
    # The downloaded copy is deleted when evaluate returns: the JSON names the artifact, which stays.
    assert out["checkpoint"] == f"runs:/{summary['run_id']}/checkpoints/best.pt"
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == summary["run_id"]
    assert run.data.tags["deepsports.evaluation_of_run"] == summary["run_id"]
    assert run.data.tags["deepsports.evaluated_epoch"] == str(summary["best_epoch"])
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("test_")} == logged
    assert {k: out[k] for k in logged} == logged
    files = {a.path for a in client.list_artifacts(out["run_id"], "quality")}
    assert files == {"quality/groups_test.csv", "quality/groups_test.png"}
    assert source.data.tags["deepsports.bootstrap"] == run.data.tags["deepsports.bootstrap"]


def test_evaluate_a_checkpoint_directory_on_val_matches_the_best_epoch(trained):
    tmp_path, uri, summary = trained
    out = _evaluate(tmp_path, uri, str(tmp_path / "ckpt"), "--split", "val", "--set", "num_workers=2")
    history = MlflowClient(uri).get_metric_history(summary["run_id"], "val_spearman")
    at_best = [m.value for m in history if m.step == summary["best_epoch"]]
    assert out["val_spearman"] == at_best[0] == summary["best_val_spearman"]
    assert out["source_run_id"] == summary["run_id"] and out["epoch"] == summary["best_epoch"]
    assert out["checkpoint"] == str((tmp_path / "ckpt" / "best.pt").resolve())


@pytest.mark.parametrize("args, message", [
    (["no-such-thing"], "evaluate: 'no-such-thing' is neither a checkpoint file or directory nor an MLflow run id"),
    (["0" * 32], f"evaluate: run {'0' * 32!r} is not in the tracking store"),
    (["CKPT", "--set", "epochs=5"], "evaluate: epochs cannot be overridden"),
    (["CKPT", "--resamples", "10"], "evaluate: --resamples 10 is too few"),
])
def test_evaluate_bad_input_exits_2_with_one_line(trained, args, message):
    tmp_path, uri, _ = trained
    args = [str(tmp_path / "ckpt" / "best.pt") if a == "CKPT" else a for a in args]
    proc = subprocess.run(deepsports_cmd("evaluate", *args), env=subprocess_env(uri), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("deepsports: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
