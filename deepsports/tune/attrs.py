"""The names of every Optuna study/trial user attribute and MLflow run tag the study code writes.

One spelling each, in one place: the worker, recovery, reports and tests import them from here.
"""

from __future__ import annotations

#: Study user attributes.
PARENT_RUN_ATTR = "deepsports.mlflow_parent_run_id"
SPACE_ATTR = "deepsports.search_space"
SPACE_SHA_ATTR = "deepsports.search_space_sha256"
EXPERIMENT_ATTR = "deepsports.experiment_name"

#: Trial user attributes.
RUN_ATTR = "deepsports.mlflow_run_id"
CKPT_ATTR = "deepsports.checkpoint_dir"
#: Why a trial failed; the same key is the failed MLflow run's tag.
REASON_ATTR = "deepsports.failure_reason"
WORKER_ATTR = "deepsports.worker"
CONFIG_ATTR = "deepsports.config"
HEARTBEAT_ATTR = "deepsports.heartbeat"        # time.time() of the last beat
PAUSED_AT_ATTR = "deepsports.paused_at"        # time.time() of the pause
PAUSED_BY_ATTR = "deepsports.paused_by"        # task_identity() of the worker that paused it
PAUSES_ATTR = "deepsports.pauses"              # how many times the trial was paused
RETRIED_FROM_ATTR = "deepsports.retried_from"  # number of the dead trial a retry re-runs
RETRY_REASON_ATTR = "deepsports.retry_reason"
RESUMED_ATTR = "deepsports.resumed_from"       # the checkpoint a resumed trial started from
TASK_ATTR = "deepsports.task"                  # task_identity() of the worker running the trial
#: A list, one entry per attempt that found the trial's checkpoint folder gone: {at, checkpoint_dir, epochs, attempt}
CKPT_LOST_ATTR = "deepsports.checkpoint_lost"

#: MLflow run tags (the failure reason's tag is REASON_ATTR).
FAILURE_REASON_TAG = REASON_ATTR
INTERRUPTED_TAG = "deepsports.interrupted"
CKPT_LOST_TAG = CKPT_LOST_ATTR                 # a run trained again from epoch 1: its checkpoint folder was gone

#: Study accounting (deepsports.tune.accounting): every attempt of a trial, and the links of re-runs.
ATTEMPTS_ATTR = "deepsports.attempts"          # trial: JSON list, one record per attempt (start, end, task...)
EPOCH_END_PREFIX = "deepsports.epoch_end."     # trial: "<prefix><attempt>.<epoch>" -> time.time() the epoch ended
RERUN_OF_ATTR = "deepsports.rerun_of"          # trial: number of the failed trial a --rerun-failed trial re-runs
MAX_TRIALS_ATTR = "deepsports.max_trials"      # study: the last max_trials a worker was given
#: Study attributes "<prefix><original number>" -> number of its retry / re-run. Optuna refuses any
#: write to a finished trial, so the link from a FAIL trial forward lives on the study.
RETRIED_BY_PREFIX = "deepsports.retried_by."
RERUN_BY_PREFIX = "deepsports.rerun_by."
#: MLflow run tags of a run that several attempts wrote (the attempts themselves: artifact attempts.json).
ATTEMPTS_TAG = ATTEMPTS_ATTR                   # how many attempts wrote the run
FIRST_FAILURE_TAG = "deepsports.first_failure_reason"
