"""``--seeds N``: sibling runs under one parent that logs mean, sd and a t interval of each test metric."""

from __future__ import annotations

import json
import math
import subprocess
import textwrap

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from deepsports.train.seeds import aggregate, metric_range
from tests.e2e_helpers import TINY, TUNE_SPACE, as_args, deepsports_cmd, run_checked, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def _children(client: MlflowClient, run) -> list:
    return client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def _check_aggregates(client: MlflowClient, parent, seeds: list[int]) -> None:
    children = sorted(_children(client, parent), key=lambda r: int(r.data.params["seed"]))
    assert [int(r.data.params["seed"]) for r in children] == seeds
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.params["seeds"] == ",".join(map(str, seeds)) and "seed" not in parent.data.params
    for key in ("test_spearman", "test_spearman_dd", "test_rel_l2", "test_rel_l2_dd", "best_val_spearman"):
        values = np.array([r.data.metrics[key] for r in children])
        sd = np.std(values, ddof=1)
        half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
        low, high = metric_range(key)  # the interval within the metric's range
        m = parent.data.metrics
        assert m[f"{key}_mean"] == pytest.approx(values.mean(), rel=1e-12), key
        assert m[f"{key}_std"] == pytest.approx(sd, rel=1e-12), key
        assert m[f"{key}_seeds_ci_low"] == pytest.approx(max(low, values.mean() - half), rel=1e-9, abs=1e-12), key
        assert m[f"{key}_seeds_ci_high"] == pytest.approx(min(high, values.mean() + half), rel=1e-9, abs=1e-12), key
    assert not any(k.endswith("_ci_low_mean") for k in parent.data.metrics)  # bootstrap bounds are not averaged


def test_seed_intervals_stay_within_the_metrics_range():
    # Two seeds (t = 12.7): the field saw Spearman [-1.12, 1.28] and a negative MSE bound.
    spearman = aggregate([0.60, 0.99], bounds=metric_range("test_spearman"))
    assert (spearman["seeds_ci_low"], spearman["seeds_ci_high"]) == (-1.0, 1.0)
    mse = aggregate([0.01, 0.5], bounds=metric_range("test_mse"))
    assert mse["seeds_ci_low"] == 0.0 and mse["seeds_ci_high"] > 0.5
    assert metric_range("test_rel_l2_dd") == metric_range("test_difficulty_mae") == (0.0, math.inf)
    assert metric_range("best_val_spearman") == metric_range("test_spearman_dd") == (-1.0, 1.0)
    loss = aggregate([-0.2, 0.1], bounds=metric_range("test_loss"))  # a loss minus a Spearman: no bound
    assert loss["seeds_ci_low"] < -0.2 and loss["seeds_ci_high"] > 0.1
    narrow = aggregate([0.80, 0.81, 0.82], bounds=metric_range("test_spearman"))  # inside: untouched
    assert narrow["seeds_ci_low"] == aggregate([0.80, 0.81, 0.82])["seeds_ci_low"] > 0.7


def test_train_seeds_logs_siblings_and_their_aggregates_once(tmp_path, tiny_cache_dir, store_uri):
    uri = store_uri
    values = tiny_overrides(tmp_path, epochs=1, cache_dir=tiny_cache_dir, checkpoint_dir=tmp_path / "ckpt", seed=3)
    cmd = deepsports_cmd("train", "--seeds", "2", *as_args(values))
    out = _json(run_checked(cmd, subprocess_env(uri), cwd=tmp_path).stdout)
    client = MlflowClient(uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and out["seeds"] == [3, 4]
    _check_aggregates(client, parent, [3, 4])
    assert out["test_spearman_mean"] == parent.data.metrics["test_spearman_mean"]
    # The same command again (as after a requeue) finds both seeds done: nothing is trained or logged twice.
    again = _json(run_checked(cmd, subprocess_env(uri), cwd=tmp_path).stdout)
    assert again["parent_run_id"] == out["parent_run_id"] and again["run_ids"] == out["run_ids"]
    assert len(_children(client, parent)) == 2
    assert len(client.get_metric_history(parent.info.run_id, "test_spearman_mean")) == 1


def test_best_retrain_seeds_nests_the_seeds_under_the_study(tmp_path, tiny_cache_dir, store_uri):
    uri = store_uri
    env = subprocess_env(uri)
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    settings = {**TINY, "cache_dir": str(tiny_cache_dir), "epochs": 1, "evaluate": "false"}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    storage = str(tmp_path / "journal.log")
    run_checked(deepsports_cmd("tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage,
                               "--n-trials", "1", "--pruner", "none", *sets), env, cwd=tmp_path)
    out = _json(run_checked(deepsports_cmd("best", "s", "--storage", storage, "--retrain", "--seeds", "2",
                                           "--out", str(tmp_path / "best.yaml")), env, cwd=tmp_path).stdout)
    client = MlflowClient(uri)
    parent = client.get_run(out["retrain"]["parent_run_id"])
    assert parent.data.tags["mlflow.parentRunId"] == out["parent_run_id"]  # the study's run
    _check_aggregates(client, parent, [0, 1])


@pytest.mark.parametrize("args, message", [
    (["train", "--seeds", "1"], "--seeds 1: expected 2 or more"),
    (["best", "nostudy", "--seeds", "3"], "--seeds 3 needs --retrain"),
])
def test_seeds_bad_input_exits_2_with_one_line(tmp_path, args, message):
    proc = subprocess.run(deepsports_cmd(*args), env=subprocess_env(f"sqlite:///{tmp_path / 'm.db'}"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("deepsports: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
