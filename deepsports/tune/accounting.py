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

``outcome`` is ``running``, ``complete``, ``pruned``, ``failed``, ``paused`` or ``dead``. A killed
worker writes nothing more: its attempt stays ``running`` and is read as ``dead`` once the trial is
no longer RUNNING (the sweep failed it), ending at the trial's last heartbeat (:func:`attempts_of`).

Compute lost (:func:`lost_seconds`) is the work an attempt did after the last checkpoint that the
next attempt resumes from: for a dead attempt, from its last finished epoch (the epoch checkpoint is
written just before the epoch's callback) to its last heartbeat; for a paused attempt, from the
checkpoint the pause wrote (``checkpoint_at``) to its end. Failed, pruned and complete attempts lose
nothing in that sense (a failed trial's compute is reported apart, as ``failed_s``).
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
from deepsports.tune.checks import CAUSES

log = logging.getLogger(__name__)

OUTCOMES = ("running", "complete", "pruned", "failed", "paused", "dead")


# --------------------------------------------------------------------------------------------
# Writing: one worker's attempt at one trial
# --------------------------------------------------------------------------------------------

class AttemptLedger:
    """The attempt record of one trial in this worker; every change is written to the trial at once."""

    def __init__(self, study: optuna.Study, trial_id: int, number: int, task: str, worker: str):
        self.storage, self.trial_id = study._storage, trial_id
        self.record: dict[str, Any] = {"trial": number, "task": task, "worker": worker}
        self._previous: list[dict[str, Any]] = []
        self.started = False

    def start(self, resumed_epoch: int | None = None) -> None:
        frozen = self.storage.get_trial(self.trial_id)
        self._previous = [dict(a) for a in frozen.user_attrs.get(ATTEMPTS_ATTR, [])]
        for old in self._previous:  # an attempt still "running" in a trial we now hold was cut off
            if old.get("outcome") == "running":
                old.update(outcome="dead", end=_last_beat(frozen, {**old, "epochs": _epochs(frozen, old)}))
        self.record.update(attempt=len(self._previous) + 1, start=time.time(), end=None, outcome="running",
                           reason=None, resumed_epoch=resumed_epoch, checkpoint_at=None)
        self._last_epoch_end = self.record["start"]
        self.started = True
        self._write()

    def epoch(self, epoch: int) -> None:
        if not self.started:
            return
        self._last_epoch_end = time.time()
        self.storage.set_trial_user_attr(self.trial_id, f"{EPOCH_END_PREFIX}{self.record['attempt']}.{int(epoch)}",
                                         self._last_epoch_end)

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

def _last_beat(trial: FrozenTrial, attempt: dict[str, Any]) -> float:
    """The end of a cut-off attempt: its last heartbeat (or last epoch, or start, whichever is latest)."""
    epochs = attempt.get("epochs") or []
    candidates = [float(attempt["start"]), *(float(e["end"]) for e in epochs[-1:])]
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if beat is not None and float(beat) >= float(attempt["start"]):
        candidates.append(float(beat))
    return max(candidates)


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
            attempt.update(outcome="dead", end=_last_beat(trial, attempt))
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
    study._storage.set_study_user_attr(study._study_id, f"{prefix}{original}", int(new))


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
        trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
        number = study._storage.get_trial_number_from_id(trial_id)
        link(study, RERUN_BY_PREFIX, failed.number, number)
        log.info("queued trial %d: a re-run of failed trial %d (%s)", number, failed.number, cause)
        out.append((failed.number, number))
    return out


def work_left(trials: list[FrozenTrial], max_trials: int, reruns: int = 0) -> int:
    """Trials still to run: originals not yet created under ``max_trials``, plus every WAITING trial (paused,
    retry, re-run), plus ``reruns`` about to be queued."""
    originals = sum(not is_extra(t) and not (t.user_attrs.get(REASON_ATTR) or "").startswith("not run:")
                    for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return max(0, max_trials - originals) + waiting + reruns
