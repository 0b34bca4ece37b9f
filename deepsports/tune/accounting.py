"""What every trial of a study did and cost: one record per attempt, failure causes, re-runs, work left.

Attempts. Optuna resets a trial's ``datetime_start`` when a paused trial is claimed again, and a dead
worker's trial is finished by somebody else, so Optuna's own times cannot say what a trial cost. The
worker therefore keeps a ledger in the trial's user attribute ``deepsports.attempts``: a JSON list with
one record per attempt (a first run, a resume after a pause, ...), written when the attempt starts
and when it ends (before the trial leaves RUNNING: Optuna refuses writes to a finished trial)::

    {"attempt": 1, "trial": 3, "task": "812_1", "worker": "node1:4242 slurm 812/1/815",
     "start": 1764222000.1, "end": 1764222031.9, "outcome": "complete", "reason": null,
     "resumed_epoch": null, "checkpoint_at": null}

and, as each epoch finishes, one small attribute ``deepsports.epoch_end.<attempt>.<epoch>`` = its
end time (one write of a few bytes per epoch: the journal grows linearly with the epochs, not with
their square). :func:`attempts_of` joins them into each record's ``epochs`` list
(``{"epoch": 1, "end": 1764222011.0, "seconds": 10.9}``, seconds since the previous epoch or the
attempt's start).

The record also holds the worker's ``heartbeat_s`` and ``grace_s`` (its heartbeat interval and grace
period): ``deepsports status`` flags a RUNNING trial silent for longer than ``grace_s`` as stale.

``outcome`` is ``running``, ``complete``, ``pruned``, ``failed``, ``paused`` or ``dead``. A killed
worker writes nothing more: its attempt stays ``running`` and is read as ``dead`` once the trial is
no longer RUNNING (the sweep failed it). When it died is known to within one heartbeat interval: it
was alive at its last sign of life (its last heartbeat or its last finished epoch, whichever came
later) and dead before the heartbeat that never came (last heartbeat + ``heartbeat_s``); the dead
attempt ends in the middle of that window (:func:`cut_off_end`), at most half an interval from the
truth, and always after its last finished epoch.

Compute lost (:func:`lost_seconds`) is the work an attempt did after the last checkpoint that the
next attempt resumes from: for a dead attempt, from its last finished epoch (the epoch checkpoint is
written just before the epoch's callback) to its end; for a paused attempt, from the checkpoint the
pause wrote (``checkpoint_at``) to its end. Failed, pruned and complete attempts lose nothing in that
sense (a failed trial's compute is reported apart, as ``failed_s``).

An epoch that finished just before a stop (training checks the stop after the epoch's checkpoint, before
its callback) gets its ``epoch_end`` record when the attempt is paused, at its checkpoint file's time
(:meth:`AttemptLedger.record_checkpointed_epochs`): every finished epoch is counted once.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from deepsports.tags import (
    ATTEMPTS_ATTR,
    EPOCH_END_PREFIX,
    HEARTBEAT_ATTR,
    REASON_ATTR,
    RERUN_BY_PREFIX,
    RERUN_CAUSE_ATTR,
    RERUN_OF_ATTR,
    RETRIED_BY_PREFIX,
    RETRIED_FROM_ATTR,
)
from deepsports.tune._optuna_compat import add_trial, set_study_attr, storage_of
from deepsports.tune.checks import CAUSES

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Writing: one worker's attempt at one trial
# --------------------------------------------------------------------------------------------

class AttemptLedger:
    """The attempt record of one trial in this worker; every change is written to the trial at once."""

    def __init__(self, study: optuna.Study, trial_id: int, number: int, task: str, worker: str,
                 heartbeat_s: float | None = None, grace_s: float | None = None):
        self.storage, self.trial_id = storage_of(study), trial_id
        self.record: dict[str, Any] = {"trial": number, "task": task, "worker": worker}
        self.beats = {"heartbeat_s": heartbeat_s, "grace_s": grace_s}
        self._previous: list[dict[str, Any]] = []
        self._epochs: set[int] = set()
        self.started = False

    def start(self, resumed_epoch: int | None = None) -> None:
        frozen = self.storage.get_trial(self.trial_id)
        self._previous = [dict(a) for a in frozen.user_attrs.get(ATTEMPTS_ATTR, [])]
        for old in self._previous:  # an attempt still "running" in a trial we now hold was cut off
            if old.get("outcome") == "running":
                old.update(outcome="dead", end=cut_off_end(frozen, {**old, "epochs": _epochs(frozen, old)}))
        self.record.update(attempt=len(self._previous) + 1, start=time.time(), end=None, outcome="running",
                           reason=None, resumed_epoch=resumed_epoch, checkpoint_at=None,
                           **{key: value for key, value in self.beats.items() if value is not None})
        self._last_epoch_end = self.record["start"]
        self.started = True
        self._write()

    def epoch(self, epoch: int) -> None:
        if not self.started:
            return
        self._write_epoch(int(epoch), time.time())

    def _write_epoch(self, epoch: int, end: float) -> None:
        self._last_epoch_end = end
        self._epochs.add(epoch)
        self.storage.set_trial_user_attr(self.trial_id, f"{EPOCH_END_PREFIX}{self.record['attempt']}.{epoch}", end)

    def record_checkpointed_epochs(self, checkpoint_dir: str | os.PathLike) -> list[int]:
        """Record the epochs this attempt finished whose callback never ran (a stop came between the epoch's
        checkpoint and its callback), at their checkpoint file's time; returns their numbers."""
        if not self.started or self.record["outcome"] != "running":
            return []
        after = max([*self._epochs, int(self.record.get("resumed_epoch") or 0)])
        found = []
        for path in Path(checkpoint_dir).glob("epoch-*.pt"):
            stem = path.stem.removeprefix("epoch-")
            try:
                written = path.stat().st_mtime
            except OSError:
                continue
            if stem.isdigit() and int(stem) > after and written >= float(self.record["start"]):
                found.append((int(stem), written))
        for epoch, written in sorted(found):
            self._write_epoch(epoch, written)
        if found:
            log.info("trial %s: epoch(s) %s finished just before the stop: counted at their checkpoint's time",
                     self.record["trial"], ", ".join(str(e) for e, _ in sorted(found)))
        return [epoch for epoch, _ in sorted(found)]

    def finish(self, outcome: str, reason: str | None = None, checkpoint_at: float | None = None) -> None:
        """Close the attempt (before the trial is told or paused). Never raises for a finished trial."""
        if not self.started or self.record["outcome"] != "running":
            return
        self.record.update(end=time.time(), outcome=outcome, reason=(reason or None) and reason[:500],
                           checkpoint_at=checkpoint_at)
        try:
            self._write()
        except UpdateFinishedTrialError:
            log.warning("trial id %d was finished by another worker: its attempt end is not recorded", self.trial_id)

    def _write(self) -> None:
        self.storage.set_trial_user_attr(self.trial_id, ATTEMPTS_ATTR, [*self._previous, self.record])


def newest_checkpoint_time(checkpoint_dir: str | os.PathLike) -> float | None:
    """When the newest epoch checkpoint file of a trial was written (what a pause leaves to resume from)."""
    directory = Path(checkpoint_dir)
    try:
        times = [p.stat().st_mtime for p in directory.glob("epoch-*.pt")]
    except OSError:
        return None
    return max(times) if times else None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def last_sign_of_life(trial: FrozenTrial) -> float:
    """The trial's last heartbeat, or its (re)start time when it has not beaten since."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0)), started)


def cut_off_end(trial: FrozenTrial, attempt: dict[str, Any]) -> float:
    """When a cut-off (dead) attempt ended: the middle between its last sign of life (last heartbeat, last
    finished epoch or start, whichever is latest) and the heartbeat that never came (last heartbeat +
    ``heartbeat_s``). Records without ``heartbeat_s`` (older workers) end at the last sign of life."""
    epochs = attempt.get("epochs") or []
    candidates = [float(attempt["start"]), *(float(e["end"]) for e in epochs[-1:])]
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if beat is not None and float(beat) >= float(attempt["start"]) - 1.0:
        # A trial beats once as its attempt starts (just before the ledger's start): that beat is this attempt's.
        candidates.append(float(beat))
    alive = max(candidates)
    interval = attempt.get("heartbeat_s")
    if beat is None or interval is None or float(beat) < float(attempt["start"]) - 1.0:
        return alive
    dead_by = float(beat) + float(interval)
    return (alive + dead_by) / 2 if dead_by > alive else alive


def _epochs(trial: FrozenTrial, attempt: dict[str, Any]) -> list[dict[str, Any]]:
    prefix = f"{EPOCH_END_PREFIX}{attempt['attempt']}."
    ends = sorted((int(key[len(prefix):]), float(value)) for key, value in trial.user_attrs.items()
                  if key.startswith(prefix) and key[len(prefix):].isdigit())
    out, previous = [], float(attempt["start"])
    for epoch, end in ends:
        out.append({"epoch": epoch, "end": end, "seconds": round(end - previous, 3)})
        previous = end
    return out


def attempts_of(trial: FrozenTrial) -> list[dict[str, Any]]:
    """The trial's attempts with their epochs; a ``running`` one of a trial that is no longer RUNNING is
    ``dead``."""
    out = []
    for attempt in trial.user_attrs.get(ATTEMPTS_ATTR, []):
        attempt = dict(attempt)
        attempt["epochs"] = _epochs(trial, attempt)
        if attempt.get("outcome") == "running" and trial.state != TrialState.RUNNING:
            attempt.update(outcome="dead", end=cut_off_end(trial, attempt))
        out.append(attempt)
    return out


def spent_seconds(attempt: dict[str, Any], now: float) -> float:
    end = attempt.get("end")
    return max(0.0, (now if end is None else float(end)) - float(attempt["start"]))


def lost_seconds(attempt: dict[str, Any]) -> float:
    """Work since the last checkpoint the next attempt resumes from (see the module docstring)."""
    outcome = attempt.get("outcome")
    if outcome not in ("dead", "paused") or attempt.get("end") is None:
        return 0.0
    epochs = attempt.get("epochs") or []
    saved = [float(attempt["start"]), *(float(e["end"]) for e in epochs[-1:])]
    if outcome == "paused" and attempt.get("checkpoint_at") is not None:
        saved.append(float(attempt["checkpoint_at"]))
    return max(0.0, float(attempt["end"]) - max(saved))


def classify(reason: str | None) -> str:
    """The cause of a failure from its recorded reason (``"<ExceptionType>: <message>"``)."""
    text = (reason or "").strip()
    lower = text.lower()
    if "stopped beating" in lower:
        return "dead_worker"
    if text.startswith("not run:"):
        return "not_run"
    if text.startswith("NonFiniteLossError") or "never finite" in lower:
        return "non_finite_loss"
    if "out of memory" in lower or "outofmemoryerror" in lower:
        return "out_of_memory"
    if text.startswith(("invalid sampled config", "ConfigError", "SearchSpaceError")):
        return "config_error"
    return "other"


def failure_cause(trial: FrozenTrial, retried: bool = False) -> str:
    """The cause of a FAIL trial: a dead worker (its last attempt was cut off, or it was retried), else
    from its reason."""
    attempts = attempts_of(trial)
    if (attempts and attempts[-1]["outcome"] == "dead") or retried:
        return "dead_worker"
    return classify(trial.user_attrs.get(REASON_ATTR))


def first_line(reason: str | None) -> str:
    lines = (reason or "").strip().splitlines()
    return lines[0][:200] if lines else "no reason recorded"


def links(study_attrs: dict[str, Any], prefix: str) -> dict[int, int]:
    """``{original number: retry or re-run number}`` from the study attributes written by :func:`link`."""
    return {int(key[len(prefix):]): int(value) for key, value in study_attrs.items()
            if key.startswith(prefix) and key[len(prefix):].isdigit()}


def link(study: optuna.Study, prefix: str, original: int, new: int) -> None:
    """Record on the study that ``new`` retries/re-runs ``original`` (the finished trial cannot hold it)."""
    set_study_attr(study, f"{prefix}{original}", int(new))


def retried_from(trial: FrozenTrial) -> int | None:
    """Number of the original trial when ``trial`` re-runs a stale or interrupted one, else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def is_extra(trial: FrozenTrial) -> bool:
    """A retry or a re-run: not one of the study's ``max_trials`` originals."""
    return retried_from(trial) is not None or RERUN_OF_ATTR in trial.user_attrs or RETRIED_FROM_ATTR in trial.user_attrs


# --------------------------------------------------------------------------------------------
# Targeted re-launch
# --------------------------------------------------------------------------------------------

def rerunnable(study: optuna.Study, causes: Iterable[str] = ()) -> list[FrozenTrial]:
    """FAIL trials of the given causes (all but ``not_run`` when none are named) that nothing has retried
    or re-run yet, oldest first."""
    wanted = set(causes) or set(CAUSES) - {"not_run"}
    attrs = study.user_attrs
    done = set(links(attrs, RETRIED_BY_PREFIX)) | set(links(attrs, RERUN_BY_PREFIX))
    trials = study.get_trials(deepcopy=False)
    done |= {int(t.user_attrs[RERUN_OF_ATTR]) for t in trials if RERUN_OF_ATTR in t.user_attrs}
    done |= {int(t.user_attrs[RETRIED_FROM_ATTR]) for t in trials if RETRIED_FROM_ATTR in t.user_attrs}
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in done
            and failure_cause(t) in wanted]


def enqueue_reruns(study: optuna.Study, causes: Iterable[str] = ()) -> list[tuple[int, int]]:
    """Queue a WAITING trial with the params of every re-runnable failed trial (see :func:`rerunnable`):
    a fresh training (new checkpoint directory and MLflow run), linked both ways. Idempotent: a trial
    re-run once is not queued again. Returns ``[(failed number, new number), ...]``."""
    out = []
    for failed in rerunnable(study, causes):
        cause = failure_cause(failed)
        template = optuna.trial.create_trial(
            state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
            user_attrs={RERUN_OF_ATTR: failed.number, RERUN_CAUSE_ATTR: cause})
        number = add_trial(study, template)
        link(study, RERUN_BY_PREFIX, failed.number, number)
        log.info("queued trial %d: a re-run of failed trial %d (%s)", number, failed.number, cause)
        out.append((failed.number, number))
    return out


def work_left(trials: list[FrozenTrial], max_trials: int, reruns: int = 0, stale: int = 0) -> int:
    """Trials still to run: originals not yet created under ``max_trials``, plus every WAITING trial (paused,
    retry, re-run), plus ``reruns`` about to be queued, plus ``stale`` RUNNING trials of dead workers (a new
    worker's sweep fails them and runs their retries)."""
    originals = sum(not is_extra(t) and not (t.user_attrs.get(REASON_ATTR) or "").startswith("not run:")
                    for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return max(0, max_trials - originals) + waiting + reruns + stale
