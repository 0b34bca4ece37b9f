"""``deepsports tune``: run trials of an Optuna study, each a child MLflow run of the study's parent.

Any number of processes (SLURM array tasks) run :func:`tune` with the same study name and storage
(see :mod:`deepsports.study` for storages and the parent run). ``n_trials``/``timeout`` limit one
worker; ``max_trials`` limits the study: trial numbers are handed out atomically by the storage, so
a trial whose number is past the budget is not trained (it is recorded FAIL with the reason
``max_trials reached``; this only happens when two workers ask for the last slot at once).

Trials. The sampled config trains with ``parent_run_id`` set; validation Spearman is reported every
epoch and a pruned trial stops at once (its run ends KILLED). A trial whose training raises
:class:`TrainingError` (NaN loss, out of memory), whose sampled config is invalid or whose
checkpoint is bad is FAIL with the reason in the user attribute ``deepsports.fail_reason``, and the
study goes on. On preemption (``stop_requested``) or Ctrl-C the trial is FAIL and queued again with
its params and checkpoint directory, so whichever worker picks it up resumes the same MLflow run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from mlflow.entities import Metric
from optuna.trial import FrozenTrial, TrialState

from deepsports import tracking
from deepsports.config import format_value
from deepsports.errors import CheckpointError, ConfigError, PreemptedError, SearchSpaceError, StorageError, TrainingError
from deepsports.search_space import SearchSpace, load_search_space
from deepsports.study import (CKPT_ATTR, CONFIG_ATTR, DEFAULT_STORAGE, EXPERIMENT_ATTR, PARENT_RUN_ATTR, PRUNERS,
                              REASON_ATTR, RUN_ATTR, WORKER_ATTR, StudySummary, constant, default_worker_id,
                              make_pruner, make_sampler, open_storage, open_study, retried_from, storage_label,
                              summarize, worker_label, worker_seed)

log = logging.getLogger("deepsports.tune")


class PrunedTrial(optuna.TrialPruned):
    """Raised from the epoch callback: Optuna records PRUNED, :func:`train` ends the MLflow run KILLED."""

    mlflow_status = "KILLED"


class _OverBudget(Exception):
    """The trial's number is past ``max_trials``: it is not trained."""


#: Per-trial failures after which the study goes on (anything else stops this worker).
TRIAL_ERRORS = (TrainingError, SearchSpaceError, CheckpointError, _OverBudget)


@dataclass(frozen=True)
class TuneSettings:
    """One worker's options (the CLI and MLproject ``tune`` options)."""

    search_space: str | os.PathLike
    study_name: str
    storage: str = DEFAULT_STORAGE
    n_trials: int | None = None         # this worker
    timeout: float | None = None        # this worker, seconds
    max_trials: int | None = None       # the whole study, all workers
    pruner: str = "median"
    seed: int | None = None             # sampler seed, mixed with the worker id
    worker_id: int | None = None        # default: $SLURM_ARRAY_TASK_ID, $SLURM_PROCID
    n_startup_trials: int = 10          # TPE: random trials before modelling
    pruner_startup_trials: int = 3      # median: completed trials before anything is pruned
    pruner_warmup_epochs: int = 1       # median: epochs never pruned
    heartbeat_interval: int = 60        # RDB storages, seconds
    grace_period: int | None = None     # RDB storages, default 2 x heartbeat_interval
    max_retry: int = 3                  # re-runs of a stale or interrupted trial
    checkpoint_root: str | os.PathLike | None = None  # default: config checkpoint_dir, else checkpoints/
    overrides: Mapping[str, Any] = field(default_factory=dict)
    parent_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner={self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        for name in ("n_trials", "max_trials"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: expected a positive number of trials (or none)")
        if not self.study_name.strip():
            raise ConfigError("the study name is empty")


def tune(settings: TuneSettings, *, stop_requested: Callable[[], bool] | None = None,
         train_fn: Callable[..., Any] | None = None) -> StudySummary:
    """Run trials until ``n_trials``/``timeout`` (this worker) or ``max_trials`` (the study) is reached.

    MLflow runs go to ``$MLFLOW_TRACKING_URI`` (as :func:`train`'s do). ``train_fn`` defaults to
    :func:`deepsports.train.train` (same signature). Raises
    :class:`PreemptedError` when ``stop_requested`` turned true; the interrupted trial is re-queued.
    """
    if train_fn is None:
        from deepsports.train import train as train_fn
    space = load_search_space(settings.search_space)
    worker_id = settings.worker_id if settings.worker_id is not None else default_worker_id()
    seed = worker_seed(settings.seed, worker_id)
    storage = open_storage(settings.storage, heartbeat_interval=settings.heartbeat_interval,
                           grace_period=settings.grace_period, max_retry=settings.max_retry)
    sampler = make_sampler(seed, settings.n_startup_trials)
    epochs = None if "epochs" in space.keys else int(constant(space, settings.overrides, "epochs"))
    pruner = make_pruner(settings.pruner, epochs, settings.pruner_startup_trials, settings.pruner_warmup_epochs)
    tags = {"optuna.sampler": f"TPESampler(seed={settings.seed}, multivariate=True, group=True)",
            "optuna.pruner": settings.pruner, "optuna.max_trials": str(settings.max_trials or "none"),
            "optuna.storage": storage_label(settings.storage)}
    study, _ = open_study(settings.study_name, storage, space, sampler=sampler, pruner=pruner,
                          overrides=settings.overrides, parent_tags=tags, parent_wait_s=settings.parent_wait_s)
    worker = _Worker(settings, space, study, train_fn, stop_requested)
    try:
        study.optimize(worker.objective, n_trials=settings.n_trials, timeout=settings.timeout, catch=TRIAL_ERRORS,
                       callbacks=[worker.after_trial], gc_after_trial=False)
    except (PreemptedError, KeyboardInterrupt):
        worker.requeue_interrupted()
        raise
    worker.close_parent_if_done()
    if stop_requested is not None and stop_requested() and not worker.budget_reached():
        raise PreemptedError(f"stop requested between trials of study {settings.study_name!r}")
    return summarize(study, worker.trials_run)


class _Worker:
    """The objective and the after-trial callback of one worker process."""

    def __init__(self, settings: TuneSettings, space: SearchSpace, study: optuna.Study, train_fn, stop_requested):
        self.settings, self.space, self.study, self.train_fn = settings, space, study, train_fn
        self.stop_requested = stop_requested
        self.tracker = tracking.RunTracker()
        self.label = worker_label()
        self.trials_run = 0
        self.current: int | None = None  # number of the trial being trained
        root = settings.checkpoint_root or constant(space, settings.overrides, "checkpoint_dir") or "checkpoints"
        # The parent id tells apart studies of the same name (another storage, or deleted and recreated).
        parent = study.user_attrs[PARENT_RUN_ATTR]
        self.checkpoint_root = Path(root).expanduser() / f"{settings.study_name}-{parent[:8]}"

    # -- objective --------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float:
        trials = self.study.get_trials(deepcopy=False)
        frozen = next(t for t in trials if t.number == trial.number)
        retry_of = retried_from(frozen)
        if retry_of is None and self._over_budget(trials, trial.number):
            self.study.stop()
            trial.set_user_attr(REASON_ATTR, f"not run: the study reached max_trials={self.settings.max_trials}")
            raise _OverBudget(f"trial {trial.number} is past max_trials={self.settings.max_trials}")
        self.trials_run += 1
        self.current = trial.number
        name = self.settings.study_name
        checkpoint_dir = frozen.user_attrs.get(CKPT_ATTR) or str(self.checkpoint_root / f"trial-{trial.number:04d}")
        trial.set_user_attr(CKPT_ATTR, checkpoint_dir)
        trial.set_user_attr(WORKER_ATTR, self.label)
        overrides = {**self.settings.overrides, "checkpoint_dir": checkpoint_dir,
                     "run_name": f"{name}-trial-{trial.number:04d}",
                     "experiment_name": self.study.user_attrs[EXPERIMENT_ATTR]}
        try:
            config = self.space.build_config(trial, overrides)
        except SearchSpaceError as exc:
            trial.set_user_attr(REASON_ATTR, f"invalid sampled config: {exc}"[:2000])
            raise
        trial.set_user_attr(CONFIG_ATTR, config.to_dict())  # what `deepsports best` exports
        tags = {"optuna.study_name": name, "optuna.trial_number": str(trial.number),
                "optuna.storage": storage_label(self.settings.storage),
                "deepsports.search_space_sha256": self.space.sha256,
                **{f"optuna.param.{k}": format_value(v) for k, v in trial.params.items()}}
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        parent = self.study.user_attrs[PARENT_RUN_ATTR]  # re-read: an adopter may have replaced it

        def on_epoch(report) -> None:
            if RUN_ATTR not in trial.user_attrs:
                trial.set_user_attr(RUN_ATTR, report.run_id)
            value = report.metrics["val_spearman"]
            if math.isfinite(value):
                trial.report(value, report.epoch)
            if trial.should_prune():
                raise PrunedTrial(f"pruned after epoch {report.epoch}: val_spearman {value:.4f}")

        try:
            result = self.train_fn(config, parent_run_id=parent, tags=tags, epoch_callback=on_epoch,
                                   stop_requested=self.stop_requested)
        except TRIAL_ERRORS as exc:
            trial.set_user_attr(REASON_ATTR, f"{type(exc).__name__}: {exc}"[:2000])
            raise
        except (PreemptedError, KeyboardInterrupt) as exc:
            trial.set_user_attr(REASON_ATTR, f"interrupted ({type(exc).__name__}); re-queued to resume from "
                                             f"{checkpoint_dir}")
            raise
        trial.set_user_attr(RUN_ATTR, result.run_id)
        self.current = None
        if not math.isfinite(result.best_val_spearman):
            reason = f"validation Spearman was never finite (best {result.best_val_spearman})"
            trial.set_user_attr(REASON_ATTR, reason)
            raise TrainingError(reason)
        return float(result.best_val_spearman)

    def _over_budget(self, trials: list[FrozenTrial], number: int) -> bool:
        """Race-free: numbers are unique and increasing, so every original trial up to ours is visible."""
        limit = self.settings.max_trials
        return limit is not None and sum(t.number <= number and retried_from(t) is None for t in trials) > limit

    def budget_reached(self) -> bool:
        """``max_trials`` original trials exist and no re-queued one waits."""
        limit = self.settings.max_trials
        trials = self.study.get_trials(deepcopy=False)
        if limit is None or any(t.state == TrialState.WAITING for t in trials):
            return False
        return sum(retried_from(t) is None for t in trials) >= limit

    # -- bookkeeping ------------------------------------------------------------------------
    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Tag the child with the trial state; log the trial's value and the running best on the parent."""
        self.current = None
        if self.budget_reached() or (self.stop_requested is not None and self.stop_requested()):
            study.stop()
        if trial.state == TrialState.FAIL and RUN_ATTR not in trial.user_attrs and CKPT_ATTR not in trial.user_attrs:
            return  # never trained (over budget): no run to tag
        uri, client = self.tracker.uri, self.tracker.client
        try:
            run_id = trial.user_attrs.get(RUN_ATTR) or self._find_child(trial.number)
            if run_id:
                tracking.call_with_retry("tag trial run", uri, client.set_tag, run_id, "optuna.trial_state",
                                         trial.state.name)
            if trial.state == TrialState.COMPLETE:
                best = max(t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                stamp = int(time.time() * 1000)
                tracking.call_with_retry("log study metrics", uri, client.log_batch, study.user_attrs[PARENT_RUN_ATTR],
                                         metrics=[Metric("trial_value", float(trial.value), stamp, trial.number),
                                                  Metric("best_value", float(best), stamp, trial.number)])
        except StorageError as exc:  # bookkeeping must not stop the study
            log.warning("could not record trial %d in MLflow: %s", trial.number, exc)

    def _find_child(self, number: int) -> str | None:
        """The run of a trial that failed before its first epoch (created by train, id never reported)."""
        client = self.tracker.client
        experiment = tracking.call_with_retry("get experiment", self.tracker.uri, client.get_experiment_by_name,
                                              self.study.user_attrs[EXPERIMENT_ATTR])
        if experiment is None:
            return None
        query = (f"tags.`optuna.study_name` = '{self.settings.study_name}' and "
                 f"tags.`optuna.trial_number` = '{number}'")
        runs = tracking.call_with_retry("find trial run", self.tracker.uri, client.search_runs,
                                        [experiment.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def requeue_interrupted(self) -> None:
        """Queue the interrupted trial again (same params, same checkpoint dir): the next worker resumes it."""
        if self.current is None:
            return
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.current)
        # Same system attributes as RetryHeartbeatStaleTrialCallback, so retried_from() sees both kinds.
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > self.settings.max_retry:
            log.warning("trial %d was interrupted %d times; not re-queued", history[0], len(history))
            return
        keep = {k: v for k, v in trial.user_attrs.items() if k in (CKPT_ATTR, RUN_ATTR)}
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, user_attrs=keep,
            system_attrs={"failed_trial": history[0], "retry_history": history},
            intermediate_values=trial.intermediate_values))
        log.info("re-queued interrupted trial %d (checkpoints in %s)", trial.number, keep.get(CKPT_ATTR))

    def close_parent_if_done(self) -> None:
        """End the parent run FINISHED once no trial runs or waits (a joining worker reopens it)."""
        if self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            return
        try:
            tracking.call_with_retry("end study run", self.tracker.uri, self.tracker.client.set_terminated,
                                     self.study.user_attrs[PARENT_RUN_ATTR], status="FINISHED")
        except StorageError as exc:
            log.warning("could not end the study's parent run: %s", exc)
