"""A study's MLflow side: the store it logs to, and the state of its parent run.

The store. The process creating a study records the MLflow store it logs to in the study attribute
``deepsports.tracking_uri`` (absolute, credentials redacted). A worker joining the study with another
store is refused, naming the one to set (:func:`check_same_store`); ``status`` and ``best`` use the
recorded store from any folder, or say which ``MLFLOW_TRACKING_URI`` to set (:func:`study_store`).
Readers never create a store.

The parent run follows the study.

The parent run is RUNNING only while some worker of the study is alive: a RUNNING trial whose last
sign of life (heartbeat, else start) is younger than the grace period. Otherwise its state is what
the trials say (:func:`parent_state`):

* KILLED: work is left that the next ``deepsports tune`` of the study picks up (a paused or queued
  trial, a dead worker's RUNNING trial), or the study stopped before ``max_trials`` without a failure
  last (Ctrl-C, SIGTERM between trials);
* FAILED: the study stopped before ``max_trials`` (or has no completed trial) and its last trial to
  end failed (a data error, a crash);
* FINISHED: otherwise (``max_trials`` reached, or no budget and a completed trial).

A worker settles the parent however it leaves (:func:`settle_parent`, from ``tune``'s ``finally``),
leaving it RUNNING when another worker's trial is alive; a worker dying too abruptly for that
(SIGKILL) leaves it RUNNING, and whoever looks next (``deepsports status``, ``best``, ``tune``)
settles it the same way. A worker starting a trial marks the parent RUNNING again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from deepsports.errors import ConfigError, StorageError
from deepsports.tags import MAX_TRIALS_ATTR, PARENT_RUN_ATTR, PARENT_STATE_ATTR, TRACKING_URI_ATTR
from deepsports.tracking.runs import RunTracker
from deepsports.tracking.store import call_with_retry
from deepsports.tracking.uris import absolute_uri, redact_uri, sqlite_path, tracking_uri
from deepsports.tune import accounting
from deepsports.tune.accounting import last_sign_of_life

log = logging.getLogger(__name__)

#: The grace period of ``deepsports tune``'s default heartbeat (60 s): a trial silent for longer is
#: judged dead by a reader that does not know the workers' settings.
DEFAULT_GRACE_S = 120.0


def alive(trials: Iterable[FrozenTrial], grace_s: float, now: float | None = None) -> list[FrozenTrial]:
    """The RUNNING trials whose worker gave a sign of life within ``grace_s``."""
    now = time.time() if now is None else now
    return [t for t in trials if t.state == TrialState.RUNNING and now - last_sign_of_life(t) <= grace_s]


def parent_state(trials: list[FrozenTrial], max_trials: int | None, grace_s: float,
                 now: float | None = None) -> str:
    """The MLflow status the study's parent run should have (see the module docstring)."""
    if alive(trials, grace_s, now):
        return "RUNNING"
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return "KILLED"
    ended = sorted((t for t in trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    last_failed = bool(ended) and ended[-1].state == TrialState.FAIL
    short = max_trials is not None and sum(not accounting.is_extra(t) for t in trials) < max_trials
    if short:
        return "FAILED" if last_failed else "KILLED"
    if any(t.state == TrialState.COMPLETE for t in trials):
        return "FINISHED"
    return "FAILED" if last_failed else "FINISHED"


def settle_parent(study: optuna.Study, tracker: RunTracker | None = None, *,
                  grace_s: float = DEFAULT_GRACE_S, only_if_running: bool = False) -> str | None:
    """Give the parent run the state :func:`parent_state` says; returns it (None: no parent, or it could not
    be read or written, which is logged: bookkeeping never stops a command).

    ``only_if_running``: change a parent that is RUNNING only (a reader fixing a stale parent; a parent
    a worker ended stays as that worker left it).
    """
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return None
    tracker = tracker or RunTracker()
    state = parent_state(study.get_trials(deepcopy=False), study.user_attrs.get(MAX_TRIALS_ATTR), grace_s)
    try:
        current = call_with_retry("read study run", tracker.uri, tracker.client.get_run, parent).info.status
        if current == state or (only_if_running and current != "RUNNING"):
            record_state(study, current)
            return current
        if state == "RUNNING":
            call_with_retry("reopen study run", tracker.uri, tracker.client.update_run, parent, status="RUNNING")
        else:
            call_with_retry("end study run", tracker.uri, tracker.client.set_terminated, parent, status=state)
    except StorageError as exc:
        log.warning("could not settle the state of study %r's parent run %s: %s", study.study_name, parent, exc)
        return None
    record_state(study, state)
    if current == "RUNNING" and state != "RUNNING":
        log.info("study %r: no worker is alive; its parent run %s is now %s (was RUNNING)", study.study_name,
                 parent, state)
    return state


def mark_running(study: optuna.Study, tracker: RunTracker) -> None:
    """A worker starts a trial: the parent is RUNNING (a reader may have settled it meanwhile)."""
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return
    try:
        call_with_retry("reopen study run", tracker.uri, tracker.client.update_run, parent, status="RUNNING")
    except StorageError as exc:
        log.warning("could not mark study %r's parent run %s RUNNING: %s", study.study_name, parent, exc)
        return
    record_state(study, "RUNNING")


def record_state(study: optuna.Study, state: str) -> None:
    """Keep the parent run's state in the study too (``deepsports.parent_run_state``), written when it changes:
    a reader (``status``) then opens MLflow only when that says RUNNING and no worker beats (a worker that
    died without settling it), not on every look."""
    if study.user_attrs.get(PARENT_STATE_ATTR) != state:
        study.set_user_attr(PARENT_STATE_ATTR, state)


def may_be_stale(study: optuna.Study, grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Whether the parent run may be RUNNING with no worker alive (only then must a reader look in MLflow)."""
    recorded = study.user_attrs.get(PARENT_STATE_ATTR)
    if recorded is not None and recorded != "RUNNING":
        return False  # a worker settled it; a worker starting since would have recorded RUNNING
    return parent_state(study.get_trials(deepcopy=False), None, grace_s) != "RUNNING"


# --------------------------------------------------------------------------------------------
# The study's MLflow store
# --------------------------------------------------------------------------------------------

def store_label(uri: str) -> str:
    """How a study records its MLflow store: absolute (it reads the same from any folder), credentials redacted."""
    return redact_uri(absolute_uri(uri))


def check_same_store(study: optuna.Study, uri: str) -> None:
    """A worker joining ``study`` logs to the store the study logs to, else ConfigError naming the one to set
    (trials in another store would be orphans of a parent they cannot reach)."""
    recorded = study.user_attrs.get(TRACKING_URI_ATTR)
    if recorded is not None and recorded != store_label(uri):
        raise ConfigError(f"study {study.study_name!r} logs to the MLflow store {recorded}, but this worker's is "
                          f"{store_label(uri)}: set MLFLOW_TRACKING_URI={recorded} (with its credentials) and run "
                          "the same command again")


def study_store(study: optuna.Study) -> str | None:
    """The MLflow store to read and write ``study``'s runs in, or None when there is none to open without
    creating one (a reader never creates a store).

    The store the study recorded when it is usable from here (no redacted secret; a SQLite file that
    exists), else ``$MLFLOW_TRACKING_URI`` when set, else :class:`ConfigError` saying which to set. A study
    from before the record uses the store in effect, if it exists.
    """
    current = tracking_uri()
    recorded = study.user_attrs.get(TRACKING_URI_ATTR)
    if recorded is None or recorded == store_label(current):
        return current if _exists(current) else None
    if "***" not in recorded and _exists(recorded):
        if recorded != store_label(current):
            log.info("study %r logs to the MLflow store %s: using it", study.study_name, recorded)
        return recorded
    if os.environ.get("MLFLOW_TRACKING_URI") and _exists(current):
        return current  # set on purpose (a moved store): the user knows
    raise ConfigError(f"study {study.study_name!r} logs to the MLflow store {recorded}, which cannot be opened from "
                      f"here: set MLFLOW_TRACKING_URI={recorded}" + (" (with its credentials)" if "***" in recorded
                                                                     else "") + " and run the same command again")


def _exists(uri: str) -> bool:
    """A SQLite store's file exists (opening a missing one would create it); any other store is assumed to."""
    path = sqlite_path(uri)
    return path is None or path.expanduser().is_file()
