"""What a tune worker writes to MLflow besides training: the tags of a study's parent run and of each
trial's run, the trial's state and value after it ends, and the study's status on the parent run.

Bookkeeping never stops a study: a store error is logged as a warning and the worker goes on.
"""

from __future__ import annotations

import logging
import time

import optuna
from mlflow.entities import Metric
from optuna.trial import FrozenTrial, TrialState

from deepsports.config import format_value
from deepsports.errors import StorageError
from deepsports.slurm.env import ClusterEnv
from deepsports.tags import (
    CKPT_ATTR,
    FAILURE_REASON_TAG,
    OPTUNA_MAX_TRIALS_TAG,
    OPTUNA_PARAM_TAG_PREFIX,
    OPTUNA_PRUNER_TAG,
    OPTUNA_RETRY_OF_TAG,
    OPTUNA_RETRY_TRIAL_NUMBER_TAG,
    OPTUNA_SAMPLER_TAG,
    OPTUNA_SAMPLER_TAG_PREFIX,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_NAME_TAG,
    OPTUNA_TRIAL_NUMBER_TAG,
    OPTUNA_TRIAL_STATE_TAG,
    PARENT_RUN_ATTR,
    RUN_ATTR,
    SPACE_SHA_TAG,
)
from deepsports.tracking.runs import RunTracker
from deepsports.tracking.store import call_with_retry
from deepsports.tune import parent as study_parent
from deepsports.tune import recovery
from deepsports.tune import status as study_status
from deepsports.tune.search_space import SearchSpace
from deepsports.tune.settings import TuneSettings
from deepsports.tune.study import sampler_settings, storage_label

log = logging.getLogger(__name__)


def parent_tags(settings: TuneSettings) -> dict[str, str]:
    """Tags of the study's parent run: how this worker samples, prunes and stores."""
    return {OPTUNA_SAMPLER_TAG: f"TPESampler(seed={settings.seed}, multivariate=True, group=True, constant_liar=True)",
            OPTUNA_PRUNER_TAG: settings.pruner, OPTUNA_MAX_TRIALS_TAG: str(settings.max_trials or "none"),
            OPTUNA_STORAGE_TAG: storage_label(settings.storage),
            **{f"{OPTUNA_SAMPLER_TAG_PREFIX}{key}": str(value)
               for key, value in sampler_settings(settings.seed, settings.n_startup_trials).items()}}


def report_progress(study: optuna.Study, frozen: FrozenTrial, settings: TuneSettings, trials_run: int) -> None:
    """One line per finished trial: number, state, value, the study's best so far, trials left."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = max(complete, key=lambda t: t.value, default=None)
    if settings.max_trials is not None:
        finished = sum(t.state.is_finished() for t in trials)
        left = f"{max(0, settings.max_trials - finished)} of max_trials={settings.max_trials} left"
    elif settings.n_trials is not None:
        left = f"{max(0, settings.n_trials - trials_run)} of this worker's n_trials={settings.n_trials} left"
    else:
        left = "no trial limit (timeout or Ctrl-C ends it)"
    value = "-" if frozen.value is None else f"{frozen.value:.4f}"
    best_text = "-" if best is None else f"{best.value:.4f} (trial {best.number})"
    log.info("trial %d %s: value %s; best so far %s; %s", frozen.number, frozen.state.name, value, best_text, left)


def trial_run_tags(settings: TuneSettings, space: SearchSpace, trial: optuna.Trial,
                   retry_of: int | None) -> dict[str, str]:
    """Tags of a trial's MLflow run: study, trial number, storage, search space, sampled params, SLURM ids."""
    tags = {OPTUNA_STUDY_NAME_TAG: settings.study_name, OPTUNA_TRIAL_NUMBER_TAG: str(trial.number),
            OPTUNA_STORAGE_TAG: storage_label(settings.storage),
            SPACE_SHA_TAG: space.sha256,
            **{f"{OPTUNA_PARAM_TAG_PREFIX}{k}": format_value(v) for k, v in trial.params.items()}}
    if retry_of is not None:
        # The run is the dead trial's: it keeps the number that created it, and every attempt is in
        # attempts.json (deepsports.tune.status.record_run_attempts).
        tags.update({OPTUNA_RETRY_OF_TAG: str(retry_of), OPTUNA_TRIAL_NUMBER_TAG: str(retry_of),
                     OPTUNA_RETRY_TRIAL_NUMBER_TAG: str(trial.number)})
    # SLURM sets SLURM_RESTART_COUNT only after a requeue: tag 0 before, so every child says it.
    tags.update(ClusterEnv.read().tags())
    return tags


def record_trial(study: optuna.Study, trial: FrozenTrial, tracker: RunTracker, storage: str) -> None:
    """Tag the trial's run with its state; log the trial's value and the running best on the parent."""
    if trial.state == TrialState.FAIL and RUN_ATTR not in trial.user_attrs and CKPT_ATTR not in trial.user_attrs:
        return  # never trained (over budget): no run to tag
    uri, client = tracker.uri, tracker.client
    run_id = None
    try:
        run_id = recovery.find_trial_run(study, trial, tracker)
        if run_id:
            call_with_retry("tag trial run", uri, client.set_tag, run_id, OPTUNA_TRIAL_STATE_TAG, trial.state.name)
        if trial.state == TrialState.COMPLETE:
            best = max(t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            stamp = int(time.time() * 1000)
            call_with_retry("log study metrics", uri, client.log_batch, study.user_attrs[PARENT_RUN_ATTR],
                            metrics=[Metric("trial_value", float(trial.value), stamp, trial.number),
                                     Metric("best_value", float(best), stamp, trial.number)])
    except StorageError as exc:  # bookkeeping must not stop the study
        log.warning("could not record trial %d in MLflow: %s", trial.number, exc)
    publish(study, run_id, trial.number, tracker, storage)


def end_pruned_run(study: optuna.Study, trial: FrozenTrial, tracker: RunTracker) -> None:
    """End the run of a trial pruned before its training resumed, as ``train`` ends a pruned one (KILLED)."""
    try:
        run_id = recovery.find_trial_run(study, trial, tracker)
        if run_id:
            call_with_retry("tag pruned trial run", tracker.uri, tracker.client.set_tag, run_id, FAILURE_REASON_TAG,
                            "PrunedTrial: pruned on resume")
            call_with_retry("end pruned trial run", tracker.uri, tracker.client.set_terminated, run_id,
                            status="KILLED")
    except StorageError as exc:
        log.warning("could not end the run of pruned trial %d: %s", trial.number, exc)


def publish(study: optuna.Study, run_id: str | None, number: int, tracker: RunTracker, storage: str) -> None:
    """The trial's run lists its attempts; the parent run shows the study's status."""
    if run_id:
        study_status.record_run_attempts(study, run_id, tracker, number)
    study_status.publish_status(study, storage_label(storage), tracker)


def close_parent_if_done(study: optuna.Study, tracker: RunTracker, storage: str, grace_s: float) -> None:
    """End the parent run FINISHED once no trial runs or waits (a joining worker reopens it); else RUNNING
    while another worker's trial beats, KILLED when what is left waits for a later worker."""
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study_parent.settle_parent(study, tracker, grace_s=grace_s)
        return
    study_status.publish_status(study, storage_label(storage), tracker)
    try:
        call_with_retry("end study run", tracker.uri, tracker.client.set_terminated, study.user_attrs[PARENT_RUN_ATTR],
                        status="FINISHED")
    except StorageError as exc:
        log.warning("could not end the study's parent run: %s", exc)
        return
    study_parent.record_state(study, "FINISHED")
