"""Trials that outlive their worker: pausing on preemption, heartbeats, and the sweep of dead workers' trials.

The protocol (what a paused trial keeps, who resumes it, when a silent trial counts as dead, what its
retry links and resumes) is told once, in docs/preemption.md ("What a stopped trial does", "Dead
workers"). Here: :func:`pause_trial` (RUNNING -> WAITING with who paused it and where its checkpoint
is), :func:`claim_waiting` (the atomic WAITING -> RUNNING claim, own paused trial first),
:class:`TrialHeartbeat` (the beat thread), :func:`sweep` with Optuna's ``fail_stale_trials`` and
:class:`StaleTrialRetry` on RDB storages or :func:`sweep_stale_journal_trials` on journal storages,
:func:`end_dead_run` and :func:`retry_trial` (the WAITING copy that resumes the dead trial's checkpoint
in its MLflow run).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from deepsports.errors import StorageError
from deepsports.slurm.env import ClusterEnv
from deepsports.tags import (
    CKPT_ATTR,
    CKPT_LOST_ATTR,
    CKPT_LOST_TAG,
    EXPERIMENT_ATTR,
    HEARTBEAT_ATTR,
    OPTUNA_TRIAL_STATE_TAG,
    PAUSED_AT_ATTR,
    PAUSED_BY_ATTR,
    PAUSES_ATTR,
    REASON_ATTR,
    RETRIED_BY_PREFIX,
    RETRIED_FROM_ATTR,
    RETRY_REASON_ATTR,
    RUN_ATTR,
    WORKER_ATTR,
)
from deepsports.tracking.runs import RunTracker
from deepsports.tracking.store import call_with_retry
from deepsports.tune._optuna_compat import add_trial, set_study_attr, storage_of, trial_id_of, trials_in
from deepsports.tune.accounting import last_sign_of_life
from deepsports.tune.settings import WORKER_GROUP_ENV

log = logging.getLogger(__name__)



def task_identity(worker_id: int | None = None) -> str:
    """Who runs this worker, stable across a requeue and unique per worker: ``<array job>_<task>`` (or the
    job id) under SLURM, else ``<host>:<pid>/worker-<id>``, the pid being that of the ``deepsports tune
    --workers N`` process that started (and restarts) the worker with that id, else the worker's own: two
    ``tune`` processes on one host never share an identity (nor take each other's paused trial for their own)."""
    group = os.environ.get(WORKER_GROUP_ENV) or str(os.getpid())
    return ClusterEnv.read().task_job_id or f"{socket.gethostname()}:{group}/worker-{worker_id or 0}"


def stale_trials(trials: list[FrozenTrial], grace_period: float, now: float | None = None) -> list[FrozenTrial]:
    """The RUNNING trials silent for longer than ``grace_period`` s: their worker is dead (or stalled), and the
    next worker of the study to sweep fails and retries them."""
    now = time.time() if now is None else now
    return [t for t in trials if t.state == TrialState.RUNNING and now - last_sign_of_life(t) > grace_period]


def will_retry(trial: FrozenTrial, max_retry: int | None) -> bool:
    """Whether :func:`retry_trial` queues a retry of ``trial`` when it dies (``max_retry`` not used up)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    return max_retry is None or len(history) <= max_retry


def uses_optuna_heartbeat(study: optuna.Study) -> bool:
    """An RDB storage opened with a heartbeat interval (Optuna's own heartbeat and stale-trial check)."""
    interval = getattr(storage_of(study), "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


class TrialHeartbeat:
    """A daemon thread that beats for one RUNNING trial until :meth:`stop`.

    ``lost`` turns true when the storage refuses the beat because the trial is finished: another worker
    judged it dead (this process was stalled for longer than the grace period) and queued a retry.
    """

    def __init__(self, study: optuna.Study, trial_id: int, interval: float):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self.lost = False
        #: time.monotonic() when the last beat that the storage accepted was sent (TrialLease reads it)
        self.last_accepted = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> TrialHeartbeat:
        self.beat()  # at once: a trial claimed from WAITING carries its old, stale heartbeat
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def beat(self) -> None:
        storage = storage_of(self.study)
        sent = time.monotonic()
        try:
            if uses_optuna_heartbeat(self.study):
                storage.record_heartbeat(self.trial_id)
            storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            self.lost = True
            self._stop.set()
            return
        self.last_accepted = sent


    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not kill the beat; the next one retries
                log.warning("heartbeat of trial id %d failed: %s: %s", self.trial_id, type(exc).__name__, exc)


#: Exit status of a worker that fenced itself (:class:`TrialLease`).
FENCED_EXIT_CODE = 9


def lease_seconds(heartbeat_interval: float, grace_period: float) -> float:
    """A trial's lease: midway between the heartbeat interval and the grace period (90 s for the defaults
    60 s and 120 s). Half the gap above the interval lets a late beat through; half the gap below the grace
    period covers the watchdog's poll and the nodes' clocks, so the lease ends before any sweeper acts."""
    return (float(heartbeat_interval) + float(grace_period)) / 2


class TrialLease:
    """Fencing: a worker cut off from its study stops for good before anyone may take its trial over.

    A node that drops off the network keeps running its jobs: SLURM requeues the task elsewhere after
    ``SlurmdTimeout``, the new worker fails the silent trial once its grace period is over and resumes it
    (a retry) in the same MLflow run and checkpoint directory, and the orphaned first attempt would go on
    training on the partitioned node, holding the checkpoint directory's lock, writing checkpoints to the
    shared file system and, once the link is back, flushing metrics into the run and results into the
    study that the retry now owns.

    The lease: the trial is this worker's for ``lease_s`` seconds after each heartbeat the storage
    accepted (:func:`lease_seconds`: midway between the heartbeat interval and the grace period), so it
    runs out before any sweeper (counting the grace period from the same beat) can fail the trial. A watchdog thread, which
    needs no storage and no network, ends the process with :data:`FENCED_EXIT_CODE` the moment the lease
    runs out: ``os._exit``, so nothing more is written by anyone in it (no checkpoint, no MLflow request
    still being retried, no Optuna call; the kernel drops the checkpoint directory's lock), and one
    line on stderr says why. A worker whose storage comes back within the lease notices nothing.
    """

    def __init__(self, heartbeat: TrialHeartbeat, lease_s: float, number: int):
        self.heartbeat, self.lease_s, self.number = heartbeat, float(lease_s), number
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{number}", daemon=True)

    def __enter__(self) -> TrialLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def expired(self) -> bool:
        return time.monotonic() - self.heartbeat.last_accepted > self.lease_s

    def _run(self) -> None:
        while not self._stop.wait(min(0.5, self.lease_s / 4)):
            if self.expired() and not self._stop.is_set():
                self._fence()

    def _fence(self) -> None:
        silent = time.monotonic() - self.heartbeat.last_accepted
        message = (f"deepsports: fenced: no heartbeat of trial {self.number} reached the study storage for "
                   f"{silent:.0f} s (lease {self.lease_s:.0f} s): another worker may take the trial over now, so "
                   f"this one stops without writing anything more ({socket.gethostname()}:{os.getpid()}, "
                   f"exit {FENCED_EXIT_CODE})\n")
        try:
            os.write(2, message.encode())
        finally:
            os._exit(FENCED_EXIT_CODE)


# --------------------------------------------------------------------------------------------
# Pause and resume
# --------------------------------------------------------------------------------------------

def pause_trial(study: optuna.Study, trial: optuna.Trial, identity: str, checkpoint_dir: str,
                run_id: str | None) -> None:
    """Record the pause, then move the trial RUNNING -> WAITING (same number, params, intermediate values)."""
    storage, trial_id = storage_of(study), trial_id_of(trial)
    frozen = storage.get_trial(trial_id)
    attrs: dict[str, Any] = {PAUSED_AT_ATTR: time.time(), PAUSED_BY_ATTR: identity, CKPT_ATTR: checkpoint_dir,
                             PAUSES_ATTR: int(frozen.user_attrs.get(PAUSES_ATTR, 0)) + 1}
    if run_id:
        attrs[RUN_ATTR] = run_id
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, TrialState.WAITING)
    log.info("paused trial %d (checkpoint %s, MLflow run %s): the next worker of the study resumes it",
             trial.number, checkpoint_dir, run_id)


def claim_waiting(study: optuna.Study, identity: str) -> optuna.Trial | None:
    """Take a WAITING trial for this worker: its own paused trial first, then the oldest waiting one.

    The claim is the storage's atomic WAITING -> RUNNING transition: when two workers race for one
    trial exactly one gets it. None when nothing waits.
    """
    storage = storage_of(study)
    waiting = trials_in(study, TrialState.WAITING)
    waiting = sorted(waiting, key=lambda t: (t.user_attrs.get(PAUSED_BY_ATTR) != identity, t.number))
    for frozen in waiting:
        if uses_optuna_heartbeat(study):
            # A paused trial keeps its last heartbeat row: refresh it before the trial is RUNNING again,
            # or a sweeping worker could fail it as stale in the instant after our claim.
            storage.record_heartbeat(trial_id_of(frozen))
        try:
            if not storage.set_trial_state_values(trial_id_of(frozen), TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        return optuna.trial.Trial(study, trial_id_of(frozen))
    return None


def keep_run_of_lost_checkpoint(trial: optuna.Trial, frozen: FrozenTrial, ckpt_dir: Path, config: Any,
                                ledger: Any) -> dict[str, str]:
    """A trial that trained before (it has an MLflow run) but whose checkpoint folder is gone (a scratch
    purge) restarts from epoch 1 in the same MLflow run, said loudly: the epochs that run holds keep their
    values (the re-run's are not logged again) and no second run carries the trial's number. ``ledger`` is
    the attempt's :class:`~deepsports.tune.accounting.AttemptLedger`. Returns the MLflow tags to add."""
    from deepsports.train.checkpoints import CheckpointManager  # torch: only once a trial runs

    run_id = frozen.user_attrs.get(RUN_ATTR)
    manager = CheckpointManager(ckpt_dir)
    if not run_id or config.resume != "auto" or (ckpt_dir.is_dir() and (manager.latest_valid() is not None
                                                                        or manager.recorded_run() is not None)):
        return {}
    epochs = max(frozen.intermediate_values, default=0)
    log.warning("trial %d: its checkpoint folder %s is gone (purged or deleted): the checkpoint is LOST and "
                "%d finished epoch(s) train again from epoch 1, in the same MLflow run %s (the values it holds "
                "for those epochs are kept, the re-run's are not logged)", trial.number, ckpt_dir, epochs, run_id)
    lost = {"at": time.time(), "checkpoint_dir": str(ckpt_dir), "epochs": epochs, "attempt": ledger.record.get("attempt")}
    trial.set_user_attr(CKPT_LOST_ATTR, [*frozen.user_attrs.get(CKPT_LOST_ATTR, []), lost])
    ledger.record["checkpoint_lost"] = epochs  # written with the attempt's next record
    manager.record_run(run_id, config.to_dict())  # train() resumes the run this file names, from epoch 1
    return {CKPT_LOST_TAG: f"checkpoint folder {ckpt_dir} gone before attempt {lost['attempt']}: "
                           f"{epochs} epoch(s) trained again"}


# --------------------------------------------------------------------------------------------
# Dead workers
# --------------------------------------------------------------------------------------------

def find_trial_run(study: optuna.Study, trial: FrozenTrial, tracker: RunTracker) -> str | None:
    """The MLflow run of a trial: its user attribute, else the run tagged with its study and number
    (a trial that died before its first epoch never stored the id)."""
    if trial.user_attrs.get(RUN_ATTR):
        return trial.user_attrs[RUN_ATTR]
    client = tracker.client
    experiment = call_with_retry("get experiment", tracker.uri, client.get_experiment_by_name,
                                          study.user_attrs.get(EXPERIMENT_ATTR, "deepsports"))
    if experiment is None:
        return None
    # A retry's own run (the dead trial had none) carries the number of the trial it retries.
    number = trial.system_attrs.get("failed_trial", trial.number)
    query = f"tags.`optuna.study_name` = '{study.study_name}' and tags.`optuna.trial_number` = '{number}'"
    runs = call_with_retry("find trial run", tracker.uri, client.search_runs, [experiment.experiment_id],
                                    filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def end_dead_run(study: optuna.Study, trial: FrozenTrial, reason: str) -> str | None:
    """End the dead trial's MLflow run FAILED with the reason (a retry may resume it later)."""
    tracker = RunTracker()
    try:
        run_id = find_trial_run(study, trial, tracker)
        if run_id is None:
            return None
        call_with_retry("tag dead run", tracker.uri, tracker.client.set_tag, run_id,
                                 REASON_ATTR, reason[:5000])
        call_with_retry("tag dead run", tracker.uri, tracker.client.set_tag, run_id,
                                 OPTUNA_TRIAL_STATE_TAG, "FAIL")
        call_with_retry("end dead run", tracker.uri, tracker.client.set_terminated, run_id, status="FAILED")
        from deepsports.tune.status import record_run_attempts  # status imports accounting, which imports us lazily

        record_run_attempts(study, run_id, tracker, trial.number)
        return run_id
    except StorageError as exc:  # bookkeeping must not stop the sweep
        log.warning("could not end the MLflow run of dead trial %d: %s", trial.number, exc)
        return None


def retry_trial(study: optuna.Study, trial: FrozenTrial, reason: str, max_retry: int | None,
                run_id: str | None = None) -> bool:
    """Queue a WAITING copy of a dead trial (same params) that resumes its checkpoint and MLflow run."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if not will_retry(trial, max_retry):
        log.warning("trial %d died %d times; not retried again (max_retry=%d)", history[0], len(history), max_retry)
        return False
    attrs = {RETRIED_FROM_ATTR: trial.number, RETRY_REASON_ATTR: reason[:2000]}
    for key in (CKPT_ATTR, RUN_ATTR):
        if trial.user_attrs.get(key):
            attrs[key] = trial.user_attrs[key]
    if run_id and RUN_ATTR not in attrs:
        attrs[RUN_ATTR] = run_id
    # The same system attributes as Optuna's retry callback, so RetryFailedTrialCallback.retried_trial_number
    # and retried_trial_numbers work on both kinds of retry.
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, user_attrs=attrs,
        system_attrs={"failed_trial": history[0], "retry_history": history},
        intermediate_values=trial.intermediate_values)
    retry_number = add_trial(study, template)
    # The dead trial is finished (Optuna refuses writes to it): the link to its retry is a study attribute.
    set_study_attr(study, f"{RETRIED_BY_PREFIX}{trial.number}", retry_number)
    log.warning("trial %d failed: %s; queued a retry with its params (checkpoints %s)", trial.number, reason,
                attrs.get(CKPT_ATTR))
    return True


class StaleTrialRetry(RetryHeartbeatStaleTrialCallback):
    """RDB storages: what Optuna calls for each trial its ``fail_stale_trials`` failed (already FAIL)."""

    def __init__(self, max_retry: int | None = None, grace_period: float | None = None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(max_retry=max_retry, inherit_intermediate_values=True)
        self._max = max_retry
        self._grace = grace_period

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = (f"worker {trial.user_attrs.get(WORKER_ATTR, '?')} stopped beating: no heartbeat for "
                  f"{self._grace or '2 x heartbeat interval'} s (killed or node lost)")
        run_id = end_dead_run(study, trial, reason)
        retry_trial(study, trial, reason, self._max, run_id)


def sweep_stale_journal_trials(study: optuna.Study, grace_period: float, max_retry: int | None,
                               now: float | None = None) -> list[int]:
    """Journal storages: fail RUNNING trials silent for ``grace_period`` s and queue their retries.

    Returns the numbers of the trials this worker failed (two sweepers never both fail one trial:
    the journal applies the first FAIL and refuses the second).
    """
    now = time.time() if now is None else now
    storage = storage_of(study)
    failed = []
    for trial in stale_trials(trials_in(study, TrialState.RUNNING), grace_period, now):
        silent = now - last_sign_of_life(trial)
        reason = (f"worker {trial.user_attrs.get(WORKER_ATTR, '?')} stopped beating: no heartbeat for "
                  f"{silent:.0f} s > grace period {grace_period:.0f} s (killed or node lost); swept by "
                  f"{socket.gethostname()}:{os.getpid()}")
        try:
            storage.set_trial_user_attr(trial_id_of(trial), REASON_ATTR, reason)
            storage.set_trial_state_values(trial_id_of(trial), TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # finished meanwhile, or another worker swept it first
        frozen = storage.get_trial(trial_id_of(trial))
        run_id = end_dead_run(study, frozen, reason)
        retry_trial(study, frozen, reason, max_retry, run_id)
        failed.append(trial.number)
    return failed


def sweep(study: optuna.Study, grace_period: float, max_retry: int | None) -> None:
    """Fail and retry the trials of dead workers (see the module docstring for both storage kinds)."""
    if uses_optuna_heartbeat(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    else:
        sweep_stale_journal_trials(study, grace_period, max_retry)
