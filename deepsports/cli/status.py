"""``deepsports status`` and the study accounting behind ``tune --rerun-failed`` and ``submit tune --missing``
(parsers + calls into :mod:`deepsports.tune.accounting` and :mod:`deepsports.tune.status`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deepsports.errors import ConfigError
from deepsports.tune.settings import DEFAULT_STORAGE, STORAGE_ENV


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="what happened to every trial of a study: states, failures by cause, "
                                      "pauses, retries, compute spent and lost, best")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", default=os.environ.get(STORAGE_ENV, DEFAULT_STORAGE),
                   help=f"Optuna storage of the study [${STORAGE_ENV} or {DEFAULT_STORAGE}]")
    p.add_argument("--json", action="store_true", help="one JSON document (keys: docs/studies.md, Watching a study)")
    p.set_defaults(func=_cmd_status)


def existing_study(name: str, storage: str):
    """The study, or a ConfigError (exit 2) naming the study and the storage given (a damaged journal stays
    a StorageError: exit 6)."""
    from deepsports.errors import JournalRecordError, StorageError
    from deepsports.tune.report import load_existing_study
    from deepsports.tune.study import storage_label

    try:
        return load_existing_study(name, storage)
    except JournalRecordError:
        raise
    except StorageError as exc:
        raise ConfigError(f"study {name!r} (--storage {storage_label(storage)}): {exc}") from exc


def study_tracking_uri(study, *, needed: bool) -> str | None:
    """The MLflow store of ``study`` (deepsports.tune.parent.study_store), its parent run there, settled when
    stale (no worker alive). ``needed``: a store without the parent run is a ConfigError naming the store to set
    (and ``$MLFLOW_TRACKING_URI`` is set to it, for the runs this command makes); else None and a warning."""
    from deepsports.errors import StorageError
    from deepsports.tags import PARENT_RUN_ATTR, TRACKING_URI_ATTR
    from deepsports.tracking.runs import RunTracker
    from deepsports.tracking.store import call_with_retry
    from deepsports.tracking.uris import tracking_uri
    from deepsports.tune import parent as study_parent

    if not needed and not study_parent.may_be_stale(study):
        return None  # a worker is alive, or the last one settled the parent: MLflow need not load
    recorded = study.user_attrs.get(TRACKING_URI_ATTR) or study_parent.store_label(tracking_uri())
    hint = f"set MLFLOW_TRACKING_URI={recorded} (the store the study logs to) and run the same command again"
    try:
        uri = study_parent.study_store(study)
        if uri is None:
            raise ConfigError(f"study {study.study_name!r}: its MLflow store {recorded} does not exist here: {hint}")
        tracker = RunTracker(uri)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent is not None:
            try:
                call_with_retry("find study run", tracker.uri, tracker.client.get_run, parent)
            except StorageError as exc:
                raise ConfigError(f"study {study.study_name!r}: its parent run {parent} is not in the MLflow store "
                                  f"{study_parent.store_label(uri)}: {hint}") from exc
        study_parent.settle_parent(study, tracker, only_if_running=True)
    except ConfigError as exc:
        if needed:
            raise
        print(f"deepsports: warning: {exc}", file=sys.stderr)
        return None
    if needed:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # the retraining runs go beside the study's parent
    return uri


def enqueue_reruns(name: str, storage: str, causes: list[str]) -> list[tuple[int, int]]:
    """``tune --workers N --rerun-failed``: queue the re-runs once, before the workers start."""
    from deepsports.tune.accounting import enqueue_reruns as enqueue
    from deepsports.tune.checks import check_causes

    return enqueue(existing_study(name, storage), check_causes(causes))


def _cmd_status(args: argparse.Namespace) -> int:
    from deepsports.tune.checks import check_study_name
    from deepsports.tune.status import render_text, study_status
    from deepsports.tune.study import storage_label

    check_study_name(args.study, "study")
    study = existing_study(args.study, args.storage)
    study_tracking_uri(study, needed=False)  # settles a parent left RUNNING by a dead worker
    doc = study_status(study, storage_label(args.storage))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render_text(doc), end="")
        from deepsports.cli.ui import study_ui
        from deepsports.tags import TRACKING_URI_ATTR

        links = study_ui(doc.get("parent_run_id"), study.user_attrs.get(TRACKING_URI_ATTR))
        if links:  # the JSON's keys stay as documented; the text says where to look
            print(f"MLflow UI: {links['trials']}\n  study run: {links['study_run']}\n  (a local store: serve it "
                  "with `deepsports ui`)")
    return 0


def missing_work(tune_args: argparse.Namespace, storage: str, profile, *, dry_run: bool) -> int:
    """``submit tune --missing``: how many array tasks the study still needs (queues the re-runs asked for,
    unless ``dry_run``). ``tune_args`` are the job's parsed ``tune`` arguments, ``storage`` the storage
    :func:`deepsports.cli.studies._check_submitted_tune` found (both checked there)."""
    from deepsports.tune.checks import check_rerun

    if tune_args.max_trials is None:
        raise ConfigError("--missing: the tune arguments after `--` need --max-trials N (the study's size)")
    causes = check_rerun(tune_args.rerun_failed, tune_args.rerun_causes)
    if "://" not in storage and not Path(storage).expanduser().is_absolute() and profile.workdir:
        storage = str(Path(os.path.expandvars(profile.workdir)).expanduser() / storage)  # where the job opens it
    if "://" not in storage and not Path(storage).expanduser().is_file():
        return tune_args.max_trials  # nothing run yet
    import optuna
    from optuna.trial import TrialState

    from deepsports.tune import accounting
    from deepsports.tune.study import open_storage

    try:
        study = optuna.load_study(study_name=tune_args.study_name, storage=open_storage(storage))
    except KeyError:
        return tune_args.max_trials
    from deepsports.tune.recovery import stale_trials, will_retry

    reruns = 0
    if tune_args.rerun_failed:
        reruns = len(accounting.rerunnable(study, causes)) if dry_run else len(accounting.enqueue_reruns(study, causes))
    trials = study.get_trials(deepcopy=False)
    # The job's workers judge staleness by their own grace period: so does this count.
    grace = float(tune_args.grace_period or 2 * tune_args.heartbeat_interval)
    stale = stale_trials(trials, grace)
    retried = [t for t in stale if will_retry(t, tune_args.max_retry)]
    left = accounting.work_left(trials, tune_args.max_trials, reruns if dry_run else 0, stale=len(retried))
    if retried:
        print(f"study {tune_args.study_name!r}: trial(s) {', '.join(str(t.number) for t in retried)} RUNNING without "
              f"a heartbeat for more than the grace period ({grace:.0f} s): their workers are dead; the new task "
              "fails and retries them")
    if left == 0:
        stale_numbers = {t.number for t in stale}
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number not in stale_numbers]
        states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
        done = (f"{states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed of "
                f"max_trials={tune_args.max_trials}")
        if running:
            print(f"study {tune_args.study_name!r} has no work for a new task ({done}; {len(running)} trial(s) "
                  f"running with a heartbeat within {grace:.0f} s, no trial waits): nothing submitted; if their "
                  "workers die, run --missing again after the grace period")
        else:
            print(f"study {tune_args.study_name!r} is complete ({done}; nothing runs or waits): nothing submitted")
    return left
