"""Resuming past a corrupt or missing newest checkpoint re-trains the epochs after the older one, and
MLflow still holds each per-epoch metric once per step (the values first logged stay)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from deepsports.config import build_config
from deepsports.errors import PreemptedError
from deepsports.train.loop import EPOCH_METRICS, train
from deepsports.train.state import TrainHooks
from tests.e2e_helpers import TINY


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_each_epoch_metric_is_logged_once_after_resuming_from_an_older_checkpoint(tmp_path, tracking_uri,
                                                                                   tiny_cache_dir, damage):
    ckpt = tmp_path / "ckpt"
    config = build_config({**TINY, "cache_dir": str(tiny_cache_dir), "epochs": 3, "checkpoint_dir": str(ckpt),
                           "evaluate": False})
    # Preempted right after epoch 2 was checkpointed and logged.
    with pytest.raises(PreemptedError):
        train(config, hooks=TrainHooks(stop_requested=lambda: (ckpt / "epoch-0002.pt").exists()))
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.experiment_name).experiment_id])
    first_epoch_2 = {key: client.get_metric_history(run.info.run_id, key)[-1].value for key in EPOCH_METRICS}
    newest = ckpt / "epoch-0002.pt"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.unlink()

    result = train(config)
    assert result.run_id == run.info.run_id and result.resumed_from_epoch == 1  # epoch 2 was trained again
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], (key, [m.step for m in history])
        assert next(m.value for m in history if m.step == 2) == first_epoch_2[key], key
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
