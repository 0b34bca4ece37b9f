"""``deepsports tune``: run trials of an Optuna study, each a child MLflow run of the study's parent.

Any number of processes (SLURM array tasks, ``--workers N`` processes) run :func:`tune` with the
same study name and storage (see :mod:`deepsports.tune.study` for storages and the parent run).
``n_trials``/``timeout`` limit one worker; ``max_trials`` limits the study: trial numbers are handed
out atomically by the storage, so a trial whose number is past the budget is not trained (it is
recorded FAIL with the reason ``max_trials reached``; this only happens when two workers ask for the
last slot at once). Retries of dead workers' trials do not count against ``max_trials``.

Trials. The sampled config trains with ``parent_run_id`` set; validation Spearman is reported every
epoch and a pruned trial stops at once (its run ends KILLED). A trial whose training raises
:class:`TrainingError` (NaN loss, out of memory), whose sampled config is invalid or whose
checkpoint is bad is FAIL with the reason in the user attribute ``deepsports.failure_reason``, and the
study goes on.

A stop (``stop_requested``, Ctrl-C) *pauses* the running trial and raises :class:`PreemptedError`;
workers take waiting (paused, retried) trials before sampling new ones; a dead worker's trial is
failed by the next sweep and retried. The protocol is told once, in docs/preemption.md ("What a
stopped trial does", "Dead workers"); :mod:`deepsports.tune.recovery` implements it. A worker that
finds ``max_trials`` reached waits, at most one grace period, for other workers' RUNNING trials to
prove alive, so that the last retry is not left behind.

Accounting (:mod:`deepsports.tune.accounting`, :mod:`deepsports.tune.status`): every attempt at a trial
(a first run, a resume, a retry) is recorded in the trial's ``deepsports.attempts`` as it starts, after
each epoch and as it ends; after each finished or paused trial the worker writes the attempts that
wrote the trial's MLflow run to that run and refreshes the study status on the parent run.
``rerun_failed`` queues the failed trials' params again and runs only waiting trials.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from deepsports.errors import (
    CheckpointError,
    ConfigError,
    DeepSportsError,
    DiskFullError,
    PreemptedError,
    SearchSpaceError,
    StorageError,
    TrainingError,
)
from deepsports.tags import (
    CKPT_ATTR,
    CONFIG_ATTR,
    EXPERIMENT_ATTR,
    MAX_TRIALS_ATTR,
    PARENT_RUN_ATTR,
    REASON_ATTR,
    RESUMED_ATTR,
    RESUMED_FROM_TAG,
    RUN_ATTR,
    SAMPLER_ATTR,
    TASK_ATTR,
    WORKER_ATTR,
)
from deepsports.tracking.runs import RunTracker
from deepsports.train.checkpoints import CheckpointManager
from deepsports.train.state import TrainHooks
from deepsports.tune import accounting, bookkeeping, recovery
from deepsports.tune import parent as study_parent
from deepsports.tune._optuna_compat import storage_of, trial_id_of
from deepsports.tune.accounting import retried_from
from deepsports.tune.checks import check_overrides
from deepsports.tune.search_space import SearchSpace, load_search_space
from deepsports.tune.settings import TuneSettings
from deepsports.tune.study import (
    StudySummary,
    constant,
    default_worker_id,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    sampler_settings,
    summarize,
    worker_label,
    worker_seed,
)

log = logging.getLogger(__name__)


class PrunedTrial(optuna.TrialPruned):
    """Raised from the epoch callback: Optuna records PRUNED, :func:`train` ends the MLflow run KILLED."""

    mlflow_status = "KILLED"


class _OverBudget(Exception):
    """The trial's number is past ``max_trials``: it is not trained."""


#: The attempt outcome (deepsports.tune.accounting) of each way a trial ends here.
_OUTCOMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}

#: Per-trial failures after which the study goes on (anything else stops this worker).
TRIAL_ERRORS = (TrainingError, SearchSpaceError, CheckpointError, _OverBudget)
#: Consecutive trials of one worker failing with the same non-training error that stop the worker.
SAME_FAILURES_STOP = 3


def tune(settings: TuneSettings, *, stop_requested: Callable[[], bool] | None = None,
         train_fn: Callable[..., Any] | None = None) -> StudySummary:
    """Run trials until ``n_trials``/``timeout`` (this worker) or ``max_trials`` (the study) is reached.

    MLflow runs go to ``$MLFLOW_TRACKING_URI`` (as :func:`train`'s do). ``train_fn`` defaults to
    :func:`deepsports.train.train` (same signature). Raises :class:`PreemptedError` when
    ``stop_requested`` turned true (the interrupted trial is paused, see the module docstring).
    """
    if train_fn is None:
        from deepsports.train.loop import train as train_fn
    space = load_search_space(settings.search_space)
    check_overrides(space, settings.overrides)  # before any storage, study or trial exists
    worker_id = settings.worker_id if settings.worker_id is not None else default_worker_id()
    seed = worker_seed(settings.seed, worker_id)
    storage = open_storage(settings.storage, heartbeat_interval=settings.heartbeat_interval,
                           grace_period=settings.grace_period, max_retry=settings.max_retry)
    sampler = make_sampler(seed, settings.n_startup_trials)
    epochs = None if "epochs" in space.keys else int(constant(space, settings.overrides, "epochs"))
    pruner = make_pruner(settings.pruner, epochs, settings.pruner_startup_trials, settings.pruner_warmup_epochs)
    study, _ = open_study(settings.study_name, storage, space, sampler=sampler, pruner=pruner,
                          overrides=settings.overrides, parent_tags=bookkeeping.parent_tags(settings),
                          parent_wait_s=settings.parent_wait_s)
    if SAMPLER_ATTR not in study.user_attrs:  # the creator's settings (a joiner's seed differs by worker only)
        study.set_user_attr(SAMPLER_ATTR, sampler_settings(settings.seed, settings.n_startup_trials))
    if settings.max_trials is not None and study.user_attrs.get(MAX_TRIALS_ATTR) != settings.max_trials:
        study.set_user_attr(MAX_TRIALS_ATTR, settings.max_trials)
    if settings.rerun_failed:
        queued = accounting.enqueue_reruns(study, settings.rerun_causes)
        log.info("re-running %d failed trials: %s", len(queued), ", ".join(f"{a} as {b}" for a, b in queued) or "none")
    worker = _Worker(settings, space, study, train_fn, stop_requested, recovery.task_identity(worker_id))
    try:
        worker.run()
    except BaseException:
        # A data error, Ctrl-C, a preemption, a crash: the parent follows the study (RUNNING while another
        # worker's trial is alive, else KILLED/FAILED as the trials say), never RUNNING forever.
        study_parent.settle_parent(study, worker.tracker, grace_s=settings.grace)
        raise
    bookkeeping.close_parent_if_done(study, worker.tracker, settings.storage, settings.grace)
    return summarize(study, worker.trials_run)


class _Worker:
    """The trial loop of one worker process: claim or ask, train, tell, book-keep."""

    def __init__(self, settings: TuneSettings, space: SearchSpace, study: optuna.Study, train_fn, stop_requested,
                 identity: str):
        self.settings, self.space, self.study, self.train_fn = settings, space, study, train_fn
        self.stop_requested = stop_requested or (lambda: False)
        self.identity = identity
        self.tracker = RunTracker()
        self.label = worker_label()
        self.trials_run = 0
        self.same_failures: list[str] = []  # reasons of this worker's latest failed trials, all alike
        root = settings.checkpoint_root or constant(space, settings.overrides, "checkpoint_dir") or "checkpoints"
        # The parent id tells apart studies of the same name (another storage, or deleted and recreated).
        parent = study.user_attrs[PARENT_RUN_ATTR]
        # Absolute: the study storage outlives this working directory, and the worker resuming a trial may run
        # elsewhere (another node of the same shared file system).
        self.checkpoint_root = Path(root).expanduser().resolve() / f"{settings.study_name}-{parent[:8]}"

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        s = self.settings
        deadline = None if s.timeout is None else time.monotonic() + s.timeout
        started = 0
        while True:
            if self.stop_requested():
                if self.budget_reached():
                    return
                raise PreemptedError(f"stop requested between trials of study {s.study_name!r}")
            if (s.n_trials is not None and started >= s.n_trials) or (deadline and time.monotonic() >= deadline):
                return
            recovery.sweep(self.study, s.grace, s.max_retry)
            trial = recovery.claim_waiting(self.study, self.identity)
            if trial is None:
                if s.rerun_failed:
                    return  # re-runs only: nothing new is sampled
                if self.budget_reached():
                    if self._wait_for_others():
                        continue
                    return
                with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize": ours beats
                    warnings.simplefilter("ignore", UserWarning)
                    trial = self.study.ask()
            started += 1
            self._run_trial(trial)

    def _run_trial(self, trial: optuna.Trial) -> None:
        heartbeat = recovery.TrialHeartbeat(self.study, trial_id_of(trial), self.settings.heartbeat_interval)
        self.ledger = ledger = accounting.AttemptLedger(self.study, trial_id_of(trial), trial.number, self.identity,
                                                        self.label, heartbeat_s=self.settings.heartbeat_interval,
                                                        grace_s=self.settings.grace)
        state, value, failed = None, None, None
        # Fencing (recovery.TrialLease): cut off from the study for longer than its lease, this process ends
        # before a sweeper may fail the trial and a retry resume it.
        lease = recovery.TrialLease(heartbeat, recovery.lease_seconds(self.settings.heartbeat_interval,
                                                                      self.settings.grace), trial.number)
        with heartbeat, lease:
            study_parent.mark_running(self.study, self.tracker)  # a reader may have settled it while no trial ran
            try:
                value = self.objective(trial, lambda: self.stop_requested() or heartbeat.lost)
                state = TrialState.COMPLETE
            except PrunedTrial:
                state = TrialState.PRUNED
            except TRIAL_ERRORS as exc:
                log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
                state = TrialState.FAIL
                failed = exc
            except (PreemptedError, KeyboardInterrupt):
                heartbeat.stop()
                if not heartbeat.lost:
                    self._pause(trial)
                    raise
            except DiskFullError:
                # Not the trial's fault, and every next trial would fail the same way: this worker stops,
                # and the trial waits (paused) to resume from its newest good checkpoint once space is freed.
                heartbeat.stop()
                if not heartbeat.lost:
                    self._pause_if_possible(trial)
                raise
            except UpdateFinishedTrialError:
                pass  # swept as dead while we ran (see heartbeat.lost)
            except BaseException as exc:
                reason = f"{type(exc).__name__}: {exc}"[:2000]
                self._try_set_attr(trial, REASON_ATTR, reason)
                ledger.finish("failed", reason)
                self._tell(trial, TrialState.FAIL)
                raise
        if heartbeat.lost:
            log.warning("trial %d was failed by another worker (no heartbeat for %.0f s: this worker stalled) and "
                        "retried there; abandoning it", trial.number, self.settings.grace)
            return
        if state is None:
            return
        reason = storage_of(self.study).get_trial(trial_id_of(trial)).user_attrs.get(REASON_ATTR)
        ledger.finish(_OUTCOMES[state], reason if state == TrialState.FAIL else None)
        frozen = self._tell(trial, state, value)
        if frozen is not None:
            bookkeeping.record_trial(self.study, frozen, self.tracker, self.settings.storage)
            bookkeeping.report_progress(self.study, frozen, self.settings, self.trials_run)
        self._stop_if_failing_alike(failed)

    def _stop_if_failing_alike(self, failed: BaseException | None) -> None:
        """A configuration or data problem fails every trial the same way: stop instead of spinning
        through the study's budget (a TrainingError, e.g. a NaN loss, depends on the sampled values)."""
        if failed is None or isinstance(failed, (TrainingError, _OverBudget)):
            self.same_failures.clear()
            return
        reason = f"{type(failed).__name__}: {failed.__cause__ or failed}"
        if self.same_failures and self.same_failures[-1] != reason:
            self.same_failures.clear()
        self.same_failures.append(reason)
        if len(self.same_failures) >= SAME_FAILURES_STOP:
            error = failed if isinstance(failed, DeepSportsError) else ConfigError(str(failed))
            raise type(error)(f"the last {len(self.same_failures)} trials of this worker failed alike, stopping: "
                              f"{reason}")

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | None = None) -> FrozenTrial | None:
        try:
            if state == TrialState.COMPLETE:
                return self.study.tell(trial, value)
            return self.study.tell(trial, state=state)
        except UpdateFinishedTrialError:
            log.warning("trial %d was finished by another worker meanwhile (judged dead)", trial.number)
            return None

    @staticmethod
    def _try_set_attr(trial: optuna.Trial, key: str, value: Any) -> None:
        try:
            trial.set_user_attr(key, value)
        except UpdateFinishedTrialError:
            pass

    def _pause_if_possible(self, trial: optuna.Trial) -> None:
        try:
            self._pause(trial)
        except (OSError, StorageError) as exc:  # the study storage may sit on the full disk too
            log.warning("could not pause trial %d (%s); it stays RUNNING until the heartbeat sweep of a later "
                        "worker retries it", trial.number, exc)

    def _pause(self, trial: optuna.Trial) -> None:
        frozen = storage_of(self.study).get_trial(trial_id_of(trial))
        ckpt = frozen.user_attrs.get(CKPT_ATTR) or str(self._checkpoint_dir(trial.number))
        try:
            run_id = recovery.find_trial_run(self.study, frozen, self.tracker)
        except StorageError as exc:
            log.warning("could not find the MLflow run of paused trial %d: %s", trial.number, exc)
            run_id = None
        self.ledger.record_checkpointed_epochs(ckpt)
        self.ledger.finish("paused", checkpoint_at=accounting.newest_checkpoint_time(ckpt))
        recovery.pause_trial(self.study, trial, self.identity, ckpt, run_id)
        bookkeeping.publish(self.study, run_id, trial.number, self.tracker, self.settings.storage)

    def _wait_for_others(self) -> bool:
        """``max_trials`` reached and nothing waits: before leaving, make sure every other RUNNING trial
        is alive (its heartbeat moves within one interval); a dead one is failed by the sweep once its
        grace period is over and its retry then waits here. True when a trial is waiting."""
        if self.settings.max_trials is None:
            return False
        seen: dict[int, float] = {}
        deadline = time.monotonic() + self.settings.grace + self.settings.heartbeat_interval
        while time.monotonic() < deadline and not self.stop_requested():
            recovery.sweep(self.study, self.settings.grace, self.settings.max_retry)
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
            if any(t.state == TrialState.WAITING for t in trials):
                return True
            if not trials:
                return False
            beats = {trial_id_of(t): accounting.last_sign_of_life(t) for t in trials}
            if seen and all(seen.get(tid, -1.0) != beat for tid, beat in beats.items()):
                return False  # every running trial beat since we looked: their workers are alive
            seen = {**beats, **seen}
            time.sleep(min(1.0, max(0.2, self.settings.heartbeat_interval / 8)))
        return False

    # -- one trial --------------------------------------------------------------------------
    def _checkpoint_dir(self, number: int) -> Path:
        return self.checkpoint_root / f"trial-{number:04d}"

    def objective(self, trial: optuna.Trial, stop_requested: Callable[[], bool]) -> float:
        trials = self.study.get_trials(deepcopy=False)
        frozen = next(t for t in trials if t.number == trial.number)
        retry_of = retried_from(frozen)
        if not accounting.is_extra(frozen) and self._over_budget(trials, trial.number):
            trial.set_user_attr(REASON_ATTR, f"not run: the study reached max_trials={self.settings.max_trials}")
            raise _OverBudget(f"trial {trial.number} is past max_trials={self.settings.max_trials}")
        self.trials_run += 1
        self.ledger.start()
        name = self.settings.study_name
        checkpoint_dir = frozen.user_attrs.get(CKPT_ATTR) or str(self._checkpoint_dir(trial.number))
        trial.set_user_attr(CKPT_ATTR, checkpoint_dir)
        trial.set_user_attr(WORKER_ATTR, self.label)
        trial.set_user_attr(TASK_ATTR, self.identity)
        overrides = {**self._artifact_defaults(), **self.settings.overrides, "checkpoint_dir": checkpoint_dir,
                     "run_name": f"{name}-trial-{trial.number:04d}",
                     "experiment_name": self.study.user_attrs[EXPERIMENT_ATTR]}
        try:
            config = self.space.build_config(trial, overrides)
        except SearchSpaceError as exc:
            trial.set_user_attr(REASON_ATTR, f"invalid sampled config: {exc}"[:2000])
            raise
        trial.set_user_attr(CONFIG_ATTR, config.to_dict())  # what `deepsports best` exports
        tags = bookkeeping.trial_run_tags(self.settings, self.space, trial, retry_of)
        resume_tags, missed = self._report_checkpointed_epochs(trial, frozen, Path(checkpoint_dir))
        tags.update(resume_tags)
        if missed and trial.should_prune():
            # Training stopped after an epoch before its callback could ask the pruner: ask now, as then.
            bookkeeping.end_pruned_run(self.study, frozen, self.tracker)
            raise PrunedTrial(f"pruned after epoch {missed[-1]} (asked on resume)")
        tags.update(recovery.keep_run_of_lost_checkpoint(trial, frozen, Path(checkpoint_dir), config, self.ledger))
        parent = self.study.user_attrs[PARENT_RUN_ATTR]  # re-read: an adopter may have replaced it
        known = set(frozen.intermediate_values)

        def on_epoch(report) -> None:
            self.ledger.epoch(report.epoch)
            if RUN_ATTR not in trial.user_attrs:
                trial.set_user_attr(RUN_ATTR, report.run_id)
            value = report.metrics["val_spearman"]
            if report.epoch not in known:
                # NaN too (constant predictions have no rank correlation): the pruner stops a trial
                # whose every reported value is NaN instead of letting it train to the end and fail.
                trial.report(value, report.epoch)
            if trial.should_prune():
                raise PrunedTrial(f"pruned after epoch {report.epoch}: val_spearman {value:.4f}")

        try:
            result = self.train_fn(config, parent_run_id=parent, tags=tags,
                                   hooks=TrainHooks(epoch_callback=on_epoch, stop_requested=stop_requested))
        except TRIAL_ERRORS as exc:
            trial.set_user_attr(REASON_ATTR, f"{type(exc).__name__}: {exc}"[:2000])
            raise
        trial.set_user_attr(RUN_ATTR, result.run_id)
        if not math.isfinite(result.best_val_spearman):
            reason = f"validation Spearman was never finite (best {result.best_val_spearman})"
            trial.set_user_attr(REASON_ATTR, reason)
            raise TrainingError(reason)
        return float(result.best_val_spearman)

    def _artifact_defaults(self) -> dict[str, bool]:
        """Trials log neither their best.pt nor their model to MLflow (tens of MB each, a study has many),
        unless asked (``keep_trial_artifacts``) or set by the user (--set, the space's fixed/base values)."""
        if self.settings.keep_trial_artifacts:
            return {}
        given = {**self.space.base_values, **self.space.fixed}
        return {key: False for key in ("log_checkpoint", "log_model") if key not in given}

    def _report_checkpointed_epochs(self, trial: optuna.Trial, frozen: FrozenTrial,
                                    ckpt_dir: Path) -> tuple[dict[str, str], list[int]]:
        """A resumed trial (paused, or a dead trial's retry): report to Optuna the checkpointed epochs it
        does not know yet (training stopped after an epoch before its callback ran), and record where
        training resumes. Returns the MLflow tags to add and the epochs reported."""
        found = CheckpointManager(ckpt_dir).latest_valid() if ckpt_dir.is_dir() else None
        if found is None:
            return {}, []
        path, state = found
        missed = []
        for row in state.get("history", []):
            epoch, value = int(row["epoch"]), float(row["val_spearman"])
            if epoch not in frozen.intermediate_values:
                trial.report(value, epoch)
                missed.append(epoch)
        resumed = {"checkpoint": str(path), "epoch": int(state["epoch"]), "step": int(state["step"])}
        trial.set_user_attr(RESUMED_ATTR, resumed)
        self.ledger.record["resumed_epoch"] = resumed["epoch"]  # written with the attempt's next record
        log.info("trial %d resumes from %s (epoch %d, step %d)", trial.number, path, resumed["epoch"], resumed["step"])
        return {RESUMED_FROM_TAG: f"{path.name} (epoch {resumed['epoch']}, step {resumed['step']})"}, missed

    def _over_budget(self, trials: list[FrozenTrial], number: int) -> bool:
        """Race-free: numbers are unique and increasing, so every original trial up to ours is visible."""
        limit = self.settings.max_trials
        return limit is not None and sum(t.number <= number and not accounting.is_extra(t) for t in trials) > limit

    def budget_reached(self) -> bool:
        """``max_trials`` original trials exist and none waits (paused, or a retry)."""
        limit = self.settings.max_trials
        trials = self.study.get_trials(deepcopy=False)
        if limit is None or any(t.state == TrialState.WAITING for t in trials):
            return False
        return sum(not accounting.is_extra(t) for t in trials) >= limit
