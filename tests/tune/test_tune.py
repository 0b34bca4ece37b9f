"""Studies with real training on a tiny synthetic set: storages, workers, parent/child runs, failures
(pruning: tests/tune/test_pruning.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.config import load_config
from deepsports.errors import ConfigError, PreemptedError, SearchSpaceError, StorageError
from deepsports.tags import CKPT_ATTR, PARENT_RUN_ATTR, PAUSED_BY_ATTR, REASON_ATTR, RESUMED_ATTR, RUN_ATTR
from deepsports.train.loop import load_training_checkpoint, train
from deepsports.tune.recovery import StaleTrialRetry, task_identity
from deepsports.tune.report import best_trial, export_best, load_existing_study, log_study_plots
from deepsports.tune.search_space import load_search_space
from deepsports.tune.settings import TuneSettings
from deepsports.tune.study import (
    create_parent_run,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    store_parent_run,
    worker_seed,
)
from deepsports.tune.worker import tune
from tests.e2e_helpers import TINY, subprocess_env

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = """\
fixed: {epochs: 2}
params:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  activation: {type: categorical, choices: [none, relu, gelu]}
"""
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)



@pytest.fixture(scope="module")
def cache_dir(tiny_cache_dir) -> Path:
    return tiny_cache_dir


def _settings(tmp_path: Path, cache_dir: Path, space_text: str = SPACE, **changes) -> TuneSettings:
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(space_text))
    overrides = {k: v for k, v in {**TINY, "cache_dir": str(cache_dir), "evaluate": False}.items()
                 if k not in ("learning_rate",)}
    overrides.update(changes.pop("overrides", {}))
    values = dict(search_space=str(space), study_name="s", storage=str(tmp_path / "study.journal"), seed=0,
                  checkpoint_root=str(tmp_path / "ckpt"), overrides=overrides, parent_wait_s=5.0)
    values.update(changes)
    return TuneSettings(**values)


def _children(client: MlflowClient, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


# --------------------------------------------------------------------------------------------
# Storages and study creation (no training)
# --------------------------------------------------------------------------------------------

def test_storages_from_paths_and_urls(tmp_path):
    with pytest.raises(ConfigError, match=r"the folder '.*/sub' does not exist: create it first"):
        open_storage(tmp_path / "sub" / "study.journal")  # a typo in a shared path starts no fresh study
    assert not (tmp_path / "sub").exists()
    (tmp_path / "sub").mkdir()
    journal = open_storage(tmp_path / "sub" / "study.journal")
    assert isinstance(journal, optuna.storages.JournalStorage)
    rdb = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=5, max_retry=2)
    assert isinstance(rdb, optuna.storages.RDBStorage)
    assert rdb.get_heartbeat_interval() == 5
    assert isinstance(rdb.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert isinstance(rdb.get_heartbeat_stale_trial_callback(), StaleTrialRetry)
    with pytest.raises(StorageError, match=r"unsupported scheme 'redis'.*journal file path"):
        open_storage("redis://localhost:6379")


def test_workers_get_distinct_seeds():
    seeds = {worker_seed(0, worker) for worker in (None, 0, 1, 2, 3)}
    assert len(seeds) == 4 and worker_seed(None, 3) is None and worker_seed(7, None) == 7


def test_joining_with_another_search_space_is_refused(tmp_path, tracking_uri):
    settings = _settings(tmp_path, tmp_path / "cache")
    space = load_search_space(settings.search_space)
    sampler, pruner = make_sampler(0), make_pruner("median", 2)
    study, parent = open_study("s", settings.storage, space, sampler=sampler, pruner=pruner)
    joined, same_parent = open_study("s", settings.storage, space, sampler=sampler, pruner=pruner)
    assert same_parent == parent and joined.user_attrs[PARENT_RUN_ATTR] == parent
    other = tmp_path / "other.yaml"
    other.write_text(SPACE.replace("gelu", "elu"))
    with pytest.raises(SearchSpaceError, match=r"samples the search space .*space.yaml.*but this worker loaded .*other.yaml"):
        open_study("s", settings.storage, load_search_space(other), sampler=sampler, pruner=pruner)


def test_a_study_whose_creator_died_before_its_parent_run_is_adopted(tmp_path, tracking_uri):
    settings = _settings(tmp_path, tmp_path / "cache")
    storage = open_storage(settings.storage)
    optuna.create_study(storage=storage, study_name="s", direction="maximize")  # creator died right here
    space = load_search_space(settings.search_space)
    study, parent = open_study("s", storage, space, sampler=make_sampler(0), pruner=make_pruner("none", 2),
                               parent_wait_s=0.2)
    assert study.user_attrs[PARENT_RUN_ATTR] == parent
    run = MlflowClient(tracking_uri).get_run(parent)
    assert run.data.tags["deepsports.kind"] == "study" and run.data.tags["optuna.study_name"] == "s"


def test_a_creator_slower_than_the_joiners_wait_keeps_the_adopted_parent_run(tmp_path, tracking_uri):
    """Under heavy load the creator's parent run can take longer than a joiner waits: the joiner adopts
    the study, and the creator, storing its run afterwards, must take the adopted one (one parent run)."""
    settings = _settings(tmp_path, tmp_path / "cache")
    storage = open_storage(settings.storage)
    created = optuna.create_study(storage=storage, study_name="s", direction="maximize")  # creator, still busy
    space = load_search_space(settings.search_space)
    _, adopted = open_study("s", storage, space, sampler=make_sampler(0), pruner=make_pruner("none", 2),
                            parent_wait_s=0.2)
    late = create_parent_run(space, "Default", "s", {"deepsports.kind": "study", "optuna.study_name": "s"})
    assert store_parent_run(created, late, settle_s=0.0) == adopted  # what the creator's open_study returns
    assert created.user_attrs[PARENT_RUN_ATTR] == adopted
    client = MlflowClient(tracking_uri)
    assert client.get_run(late).info.lifecycle_stage == "deleted"
    experiment = client.get_run(adopted).info.experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`deepsports.kind` = 'study'")
    assert [r.info.run_id for r in parents] == [adopted]


# --------------------------------------------------------------------------------------------
# Trials with real training
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_failing_trials_are_recorded_fail_and_the_study_goes_on(tmp_path, tracking_uri, cache_dir):
    # SGD at a learning rate of 1e30 without clipping: the second step's loss is not finite.
    space = "params:\n  learning_rate: {type: categorical, choices: [1.0e+30]}\n"
    settings = _settings(tmp_path, cache_dir, space, n_trials=2,
                         overrides={"optimizer": "SGD", "grad_clip_norm": 0.0, "epochs": 1})
    summary = tune(settings)
    assert summary.states["FAIL"] == 2 and summary.trials_run == 2 and summary.best_value is None
    study = optuna.load_study(study_name="s", storage=open_storage(settings.storage))
    client = MlflowClient(tracking_uri)
    for trial in study.trials:
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[REASON_ATTR].startswith("NonFiniteLossError: loss became")
    children = _children(client, summary.parent_run_id)
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1"]
    assert {r.info.status for r in children} == {"FAILED"}
    assert {r.data.tags["optuna.trial_state"] for r in children} == {"FAIL"}
    assert client.get_run(summary.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_trial_whose_validation_spearman_is_nan_is_pruned_at_once(tmp_path, tracking_uri, cache_dir):
    """Constant predictions have no rank correlation (NaN): the NaN reaches Optuna and the median
    pruner stops that trial after its first epoch, instead of it training to the end."""
    import dataclasses
    import math

    def second_trial_predicts_constants(config, *, hooks, tags, **kwargs):
        report_to_optuna = hooks.epoch_callback

        def report_nan(report):
            return report_to_optuna(dataclasses.replace(report, metrics={**report.metrics, "val_spearman": math.nan}))
        if tags["optuna.trial_number"] == "1":
            hooks = dataclasses.replace(hooks, epoch_callback=report_nan)
        return train(config, hooks=hooks, tags=tags, **kwargs)

    settings = _settings(tmp_path, cache_dir, n_trials=2, pruner="median", pruner_startup_trials=1,
                         pruner_warmup_epochs=0, overrides={"epochs": 3})
    summary = tune(settings, train_fn=second_trial_predicts_constants)
    study = optuna.load_study(study_name="s", storage=open_storage(settings.storage))
    first, second = sorted(study.trials, key=lambda t: t.number)
    assert first.state == TrialState.COMPLETE and list(first.intermediate_values) == [1, 2, 3]
    assert second.state == TrialState.PRUNED
    assert list(second.intermediate_values) == [1] and math.isnan(second.intermediate_values[1])
    client = MlflowClient(tracking_uri)
    child = next(r for r in _children(client, summary.parent_run_id) if r.data.tags["optuna.trial_number"] == "1")
    assert child.info.status == "KILLED" and child.data.tags["optuna.trial_state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1]


def test_a_preempted_trial_is_paused_and_resumed_as_the_same_trial_and_run(tmp_path, tracking_uri, cache_dir):
    settings = _settings(tmp_path, cache_dir, n_trials=1, pruner="none")
    polls = {"n": 0}

    def stop_after_a_few_steps() -> bool:  # the SIGUSR1 flag of a SLURM job, raised mid epoch 2
        polls["n"] += 1
        return polls["n"] >= 9

    with pytest.raises(PreemptedError):
        tune(settings, stop_requested=stop_after_a_few_steps)
    study = optuna.load_study(study_name="s", storage=open_storage(settings.storage))
    (paused,) = study.trials
    assert paused.state == TrialState.WAITING and REASON_ATTR not in paused.user_attrs
    assert paused.user_attrs[PAUSED_BY_ATTR] == task_identity(None) and paused.user_attrs[RUN_ATTR]
    partial = sorted(Path(paused.user_attrs[CKPT_ATTR]).glob("epoch-*-partial.pt"))
    assert [p.name for p in partial] == ["epoch-0002-partial.pt"] and list(paused.intermediate_values) == [1]
    saved_step = load_training_checkpoint(partial[0])["step"]
    assert saved_step >= 1

    summary = tune(settings)  # the requeued job
    study = optuna.load_study(study_name="s", storage=open_storage(settings.storage))
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.number == 0 and trial.params == paused.params
    assert trial.user_attrs[RUN_ATTR] == paused.user_attrs[RUN_ATTR] and list(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs[RESUMED_ATTR] == {"checkpoint": str(partial[0]), "epoch": 2, "step": saved_step}
    client = MlflowClient(tracking_uri)
    run = client.get_run(trial.user_attrs[RUN_ATTR])
    assert run.info.status == "FINISHED" and run.data.tags["deepsports.resumes"] == "1"
    assert run.data.tags["deepsports.resumed_from"] == f"epoch-0002-partial.pt (epoch 2, step {saved_step})"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_spearman")) == [1, 2]
    assert [r.info.run_id for r in _children(client, summary.parent_run_id)] == [run.info.run_id]
    assert summary.best_value == trial.value and summary.states["COMPLETE"] == 1


_WORKER = """\
import json, sys
from deepsports.tune.report import best_trial, export_best, load_existing_study, log_study_plots
from deepsports.train.loop import train
from deepsports.tune.worker import TuneSettings, tune
summary = tune(TuneSettings(**json.loads(sys.argv[1])))
print(json.dumps({"trials_run": summary.trials_run}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("storage_kind", ["journal", "sqlite"])
def test_two_worker_processes_share_one_study_up_to_max_trials(tmp_path, tracking_uri, cache_dir, storage_kind):
    max_trials = 4
    storage = str(tmp_path / "study.journal") if storage_kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    settings = _settings(tmp_path, cache_dir, storage=storage, n_trials=10, max_trials=max_trials,
                         overrides={"epochs": 1})
    base = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()}
    # One thread each: two processes spinning two OpenMP threads each on two cores run 50x slower.
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps({**base, "worker_id": worker})],
                              env=subprocess_env(tracking_uri, OMP_NUM_THREADS="1"), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for worker in (0, 1)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-6000:]

    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # none lost, none duplicated
    trained = [t for t in study.trials if not t.user_attrs.get(REASON_ATTR, "").startswith("not run")]
    assert [t.number for t in trained] == list(range(max_trials))
    assert all(t.state in FINISHED for t in study.trials)
    skipped = [t for t in study.trials if t not in trained]  # two workers asked for the last slot at once
    assert all(t.state == TrialState.FAIL and t.number >= max_trials for t in skipped)
    assert sum(json.loads(out)["trials_run"] for out, _ in outputs) == max_trials

    client = MlflowClient(tracking_uri)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    experiment = client.get_run(parent).info.experiment_id
    parents = client.search_runs([experiment],
                                 filter_string="tags.`optuna.study_name` = 's' and tags.`deepsports.kind` = 'study'")
    assert [r.info.run_id for r in parents] == [parent]
    children = _children(client, parent)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(max_trials))
    assert {r.info.run_id for r in children} == {t.user_attrs[RUN_ATTR] for t in trained}
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_best_trial_exports_an_experiment_that_trains_and_plots_the_study(tmp_path, tracking_uri, cache_dir):
    settings = _settings(tmp_path, cache_dir, n_trials=3, pruner="none", overrides={"epochs": 1})
    summary = tune(settings)
    study = load_existing_study("s", settings.storage)
    best = best_trial(study)
    assert (best.number, best.value, best.run_id) == (summary.best_number, summary.best_value, summary.best_run_id)
    assert best.config.learning_rate == best.params["learning_rate"] and best.config.checkpoint_dir == ""
    # Trials keep best.pt in their checkpoint folder only; the best config logs it (and its model) again.
    client = MlflowClient(tracking_uri)
    assert "checkpoints" not in {a.path for a in client.list_artifacts(best.run_id)}
    assert (Path(study.best_trial.user_attrs[CKPT_ATTR]) / "best.pt").is_file()
    assert best.config.log_checkpoint and best.config.log_model

    path = export_best(best, tmp_path / "experiments" / "s_best.yaml")
    config = load_config(path)
    assert config == best.config
    result = train(config.replace(checkpoint_dir=str(tmp_path / "retrain"), log_model=False))
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == ["checkpoints/best.pt"]

    logged = log_study_plots(study)
    assert "study_plots/optimization_history.png" in logged and "study_plots/param_importances.png" in logged
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(summary.parent_run_id, "study_plots")}
    assert set(logged) <= artifacts
    pages = [a for a in client.list_artifacts(summary.parent_run_id, "study_plots") if a.path.endswith(".html")]
    assert pages and all(a.file_size < 500_000 for a in pages)  # plotly.js is not inlined (4.8 MB each)
    with pytest.raises(StorageError, match=r"no study 'nope' in .*study.journal \(studies there: s\)"):
        load_existing_study("nope", settings.storage)
