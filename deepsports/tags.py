"""Every MLflow run tag and Optuna study/trial user attribute name DeepSports writes, one spelling each.

A bottom module: every room (train, tracking, tune, slurm, cli) may import it, and nothing else in the
package spells a ``"deepsports.…"`` tag (tests/test_architecture.py checks). Where a run tag and a
user attribute carry the same fact they share one spelling, and the second name is an alias.
A ``…_PREFIX`` is completed with a key: ``f"{CONFIG_TAG_PREFIX}{key}"``.
"""

from __future__ import annotations

# --- Run tags: where and from what a run was made (tracking.runs.environment_tags) ---
GIT_COMMIT_TAG = "deepsports.git_commit"
GIT_DIRTY_TAG = "deepsports.git_dirty"
HOST_TAG = "deepsports.host"
VERSION_TAG = "deepsports.version"
PYTHON_TAG = "deepsports.python"

# --- Run tags: the run's own life (tracking.runs.RunTracker) ---
RESUMES_TAG = "deepsports.resumes"                   # how many times the run was resumed (0 = never)
PARAM_CHANGED_PREFIX = "deepsports.param_changed."   # "<prefix><key>": a resume's value of a changed param
MODEL_URI_TAG = "deepsports.model_uri"
#: Why a run (or trial) failed; the same key is the failed trial's user attribute.
REASON_ATTR = "deepsports.failure_reason"
FAILURE_REASON_TAG = REASON_ATTR
INTERRUPTED_TAG = "deepsports.interrupted"           # "true": stopped by a signal or Ctrl-C, resumable

# --- Run tags: training (train.loop, train.reporting, train.seeds, train.quality, train.checkpoint_eval) ---
WORLD_SIZE_TAG = "deepsports.world_size"
#: On a run resumed from a checkpoint: "true" when every resume so far continued the stopped run bit for bit.
RESUME_EXACT_TAG = "deepsports.resume_exact"
RESUME_INEXACT_TAG = "deepsports.resume_inexact_reason"  # "-", or why a resume was not exact ("; "-separated)
BEST_EPOCH_TAG = "deepsports.best_epoch"
DEVICE_TAG = "deepsports.device"
TRAINABLE_PARAMS_TAG = "deepsports.trainable_params"
TOTAL_PARAMS_TAG = "deepsports.total_params"
DATASET_TAG_PREFIX = "deepsports.dataset."           # "<prefix><fingerprint key>"
CONFIG_TAG_PREFIX = "deepsports.config."             # "<prefix><location key>" (cache_dir, ...)
SEEDS_TAG = "deepsports.seeds"                       # parent of a multi-seed run: the seeds, comma-separated
SEED_PARENT_RUN_TAG = "deepsports.seed_parent_run"
BOOTSTRAP_TAG = "deepsports.bootstrap"
GROUP_MIN_CLIPS_TAG = "deepsports.group_min_clips"
EVALUATION_OF_RUN_TAG = "deepsports.evaluation_of_run"
EVALUATED_SPLIT_TAG = "deepsports.evaluated_split"
EVALUATED_CHECKPOINT_TAG = "deepsports.evaluated_checkpoint"
EVALUATED_EPOCH_TAG = "deepsports.evaluated_epoch"
EVALUATED_MODEL_TAG = "deepsports.evaluated_model"   # the models:/NAME@ALIAS an evaluation was asked for

# --- Study user attributes ---
PARENT_RUN_ATTR = "deepsports.mlflow_parent_run_id"
SPACE_ATTR = "deepsports.search_space"
SPACE_SHA_ATTR = "deepsports.search_space_sha256"
EXPERIMENT_ATTR = "deepsports.experiment_name"
TRACKING_URI_ATTR = "deepsports.tracking_uri"        # the MLflow store the study logs to (absolute, redacted)
PARENT_STATE_ATTR = "deepsports.parent_run_state"  # the state a worker last gave the parent run
MAX_TRIALS_ATTR = "deepsports.max_trials"            # the last max_trials a worker was given
SAMPLER_ATTR = "deepsports.sampler"                  # the TPE settings (tune.study.sampler_settings), a dict
#: "<prefix><original number>" -> number of its retry / re-run. Optuna refuses any write to a finished
#: trial, so the link from a FAIL trial forward lives on the study.
RETRIED_BY_PREFIX = "deepsports.retried_by."
RERUN_BY_PREFIX = "deepsports.rerun_by."

# --- Trial user attributes ---
RUN_ATTR = "deepsports.mlflow_run_id"
CKPT_ATTR = "deepsports.checkpoint_dir"              # where the trial's checkpoints are
WORKER_ATTR = "deepsports.worker"
CONFIG_ATTR = "deepsports.config"
HEARTBEAT_ATTR = "deepsports.heartbeat"              # time.time() of the last beat
PAUSED_AT_ATTR = "deepsports.paused_at"              # time.time() of the pause
PAUSED_BY_ATTR = "deepsports.paused_by"              # task_identity() of the worker that paused it
PAUSES_ATTR = "deepsports.pauses"                    # how many times the trial was paused
RETRIED_FROM_ATTR = "deepsports.retried_from"        # number of the dead trial a retry re-runs
RETRY_REASON_ATTR = "deepsports.retry_reason"
RESUMED_ATTR = "deepsports.resumed_from"             # the checkpoint a resumed trial started from
TASK_ATTR = "deepsports.task"                        # task_identity() of the worker running the trial
#: One entry per attempt that found the trial's checkpoint folder gone: {at, checkpoint_dir, epochs, attempt}
CKPT_LOST_ATTR = "deepsports.checkpoint_lost"
#: Study accounting (deepsports.tune.accounting): every attempt of a trial, and the links of re-runs.
ATTEMPTS_ATTR = "deepsports.attempts"                # JSON list, one record per attempt (start, end, task...)
EPOCH_END_PREFIX = "deepsports.epoch_end."           # "<prefix><attempt>.<epoch>" -> time.time() the epoch ended
RERUN_OF_ATTR = "deepsports.rerun_of"                # number of the failed trial a --rerun-failed trial re-runs
RERUN_CAUSE_ATTR = "deepsports.rerun_cause"          # why it was re-run (the user's --cause)

# --- Run tags of studies and trials (tune, cli.studies) ---
CHECKPOINT_DIR_TAG = CKPT_ATTR                      # every training run: where its checkpoints are
KIND_TAG = "deepsports.kind"                         # "study" on a study's parent run
SPACE_TAG = SPACE_ATTR
SPACE_SHA_TAG = SPACE_SHA_ATTR
RESUMED_FROM_TAG = RESUMED_ATTR
CKPT_LOST_TAG = CKPT_LOST_ATTR                       # a run trained again from epoch 1: its checkpoint folder was gone
STUDY_PARENT_RUN_TAG = "deepsports.study_parent_run_id"  # a worker's own run -> the study's parent run
RETRAIN_OF_TRIAL_TAG = "deepsports.retrain_of_trial"
RETRAIN_OF_RUN_TAG = "deepsports.retrain_of_run"
#: Runs that several attempts wrote (the attempts themselves: artifact attempts.json).
ATTEMPTS_TAG = ATTEMPTS_ATTR                         # how many attempts wrote the run
ATTEMPT_TAG_PREFIX = "deepsports.attempt."           # "<prefix><i>": one line per attempt
FIRST_FAILURE_TAG = "deepsports.first_failure_reason"

# --- Optuna's facts on MLflow runs ---
OPTUNA_STUDY_NAME_TAG = "optuna.study_name"
OPTUNA_STORAGE_TAG = "optuna.storage"
OPTUNA_SAMPLER_TAG = "optuna.sampler"
OPTUNA_SAMPLER_TAG_PREFIX = "optuna.sampler."       # "<prefix><setting>": each TPE setting of the study
OPTUNA_PRUNER_TAG = "optuna.pruner"
OPTUNA_MAX_TRIALS_TAG = "optuna.max_trials"
OPTUNA_TRIAL_NUMBER_TAG = "optuna.trial_number"
OPTUNA_TRIAL_STATE_TAG = "optuna.trial_state"
OPTUNA_RETRY_OF_TAG = "optuna.retry_of"
OPTUNA_RETRY_TRIAL_NUMBER_TAG = "optuna.retry_trial_number"
OPTUNA_PARAM_TAG_PREFIX = "optuna.param."           # "<prefix><name>": a trial's sampled value

# --- Model registry: tags of a registered model version (tracking.registry) ---
VERSION_STUDY_TAG = "deepsports.study"
VERSION_TRIAL_TAG = "deepsports.trial"
VERSION_RUN_TAG = "deepsports.run_id"
VERSION_METRIC_PREFIX = "metric."                    # "<prefix><run metric>": the run's value (repr of a float)
