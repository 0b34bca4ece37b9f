"""Faults inside training end the run FAILED with the reason as a tag, the trial FAIL, and the study goes on.

Faults: a non-finite loss (SGD at learning rate 1e30), out-of-memory (``train``'s ``fault_hook``
raises ``torch.OutOfMemoryError`` at a step), and an exception inside a DataLoader worker process
(``num_workers=1``; the cached clips are replaced by garbage after the first step, so the worker's
next reads fail).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.config import build_config
from deepsports.data import build_datasets
from deepsports.tags import REASON_ATTR, RUN_ATTR
from deepsports.train.loop import train
from deepsports.tune.settings import TuneSettings
from deepsports.tune.status import study_status
from deepsports.tune.study import open_storage
from deepsports.tune.worker import tune
from tests.e2e_helpers import TINY

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults-cache")
    build_datasets(build_config({**TINY, "cache_dir": str(path)}), progress=False)
    return path


def _oom_at_step_1(where: str, step: int) -> None:
    if where == "step" and step == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


def _garbage_clips_after_step_0(cache: Path):
    """A hook that atomically replaces every cached clip with bytes that are not a .npy file."""
    def hook(where: str, step: int) -> None:
        if where == "step" and step == 0:
            for clip in (cache / "clips").rglob("*.npy"):
                garbage = clip.with_name(".garbage")
                garbage.write_bytes(b"\x93NUMPY garbage")
                os.replace(garbage, clip)  # a new file: memory maps the worker holds stay valid
    return hook


def _faulty_train(tmp_path: Path, cache_dir: Path):
    """``train`` with one fault per trial number: 0 OOM, 1 NaN loss, 2 DataLoader worker error, 3 none."""
    def train_fn(config, **kwargs):
        number = int(kwargs["tags"]["optuna.trial_number"])
        if number == 0:
            return train(config, hooks=dataclasses.replace(kwargs.pop("hooks"), fault_hook=_oom_at_step_1), **kwargs)
        if number == 1:
            return train(config.replace(learning_rate=1e30, optimizer="SGD", grad_clip_norm=0.0), **kwargs)
        if number == 2:
            private = tmp_path / "trial-2-cache"  # this trial's own copy, so the garbage stays with it
            shutil.copytree(cache_dir, private)
            hooks = dataclasses.replace(kwargs.pop("hooks"), fault_hook=_garbage_clips_after_step_0(private))
            return train(config.replace(cache_dir=str(private), num_workers=1), hooks=hooks, **kwargs)
        return train(config, **kwargs)
    return train_fn


REASONS = {0: ("TrainingError: out of memory at epoch 1 step 2", "TrainingError: out of memory at epoch 1 step 2"),
           1: ("NonFiniteLossError: loss became", "NonFiniteLossError: loss became"),
           2: ("TrainingError: a DataLoader worker failed loading batch", "TrainingError: a DataLoader worker failed")}
#: The worker's error keeps its type and its own one-line message (file named), without torch's traceback.
WORKER_REASON = "deepsports.errors.DataError: cached clip '"


def test_faulty_trials_fail_with_their_reason_and_the_study_goes_on(tmp_path, tracking_uri, cache_dir):
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""\
        fixed: {epochs: 1, warmup_epochs: 0}
        params:
          activation: {type: categorical, choices: [relu, gelu]}
        """))
    overrides = {k: v for k, v in {**TINY, "cache_dir": str(cache_dir), "evaluate": False}.items()}
    settings = TuneSettings(search_space=str(space), study_name="faults", storage=str(tmp_path / "study.journal"),
                            n_trials=4, seed=0, pruner="none", checkpoint_root=str(tmp_path / "ckpt"),
                            overrides=overrides, parent_wait_s=5.0)
    summary = tune(settings, train_fn=_faulty_train(tmp_path, cache_dir))

    assert summary.trials_run == 4 and summary.states["FAIL"] == 3 and summary.states["COMPLETE"] == 1
    study = optuna.load_study(study_name="faults", storage=open_storage(settings.storage))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    client = MlflowClient(tracking_uri)
    experiment = client.get_run(summary.parent_run_id).info.experiment_id
    children = {int(r.data.tags["optuna.trial_number"]): r for r in client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")}
    assert sorted(children) == [0, 1, 2, 3]
    for trial in trials[:3]:
        trial_reason, run_reason = REASONS[trial.number]
        assert trial.user_attrs[REASON_ATTR].startswith(trial_reason), trial.user_attrs[REASON_ATTR]
        run = children[trial.number]
        assert run.info.status == "FAILED", trial.number
        assert run.data.tags["deepsports.failure_reason"].startswith(run_reason), run.data.tags
        assert run.data.tags["optuna.trial_state"] == "FAIL"
    reason = trials[2].user_attrs[REASON_ATTR]
    assert WORKER_REASON in reason and "cannot be read" in reason and "Traceback" not in reason, reason
    assert children[3].info.status == "FINISHED" and children[3].info.run_id == trials[3].user_attrs[RUN_ATTR]
    assert client.get_run(summary.parent_run_id).info.status == "FINISHED"
    # `deepsports status` groups them by cause; the parent run holds the same.
    doc = study_status(study)
    by_cause = {cause: group["trials"] for cause, group in doc["failed"]["by_cause"].items() if group["count"]}
    assert by_cause == {"out_of_memory": [0], "non_finite_loss": [1], "other": [2]}
    (other,) = doc["failed"]["other"]
    assert other["trials"] == [2] and other["error"] == trials[2].user_attrs[REASON_ATTR].splitlines()[0][:200]
    parent = client.get_run(summary.parent_run_id).data.metrics
    assert (parent["status_fail_out_of_memory"], parent["status_fail_non_finite_loss"], parent["status_fail_other"],
            parent["status_complete"]) == (1, 1, 1, 1)
