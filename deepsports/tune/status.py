"""``deepsports status``: one document that says what happened to every trial of a study and what it cost.

:func:`study_status` builds it from the study alone (trial states, user attributes and the attempt
ledger of :mod:`deepsports.tune.accounting`); :func:`render_text` is the screen, :func:`render_markdown`
the parent run's ``study_status.md``; :func:`publish_status` puts counts, JSON and markdown on the
study's MLflow parent run. The JSON keys are listed in docs/studies.md ("Watching a study") and do not change:
new keys may be added, none is renamed or removed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from deepsports.tags import (
    ATTEMPT_TAG_PREFIX,
    CKPT_ATTR,
    HEARTBEAT_ATTR,
    MAX_TRIALS_ATTR,
    PARENT_RUN_ATTR,
    PAUSED_AT_ATTR,
    PAUSED_BY_ATTR,
    REASON_ATTR,
    RERUN_BY_PREFIX,
    RERUN_CAUSE_ATTR,
    RERUN_OF_ATTR,
    RETRIED_BY_PREFIX,
    RETRY_REASON_ATTR,
    RUN_ATTR,
    TASK_ATTR,
)
from deepsports.tune import accounting as acc
from deepsports.tune.accounting import retried_from

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def study_status(study: optuna.Study, storage_label: str = "", now: float | None = None) -> dict[str, Any]:
    """The whole account of a study as one JSON-ready document (keys: docs/studies.md, "Watching a study")."""
    now = time.time() if now is None else now
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    retried_by, rerun_by = acc.links(attrs, RETRIED_BY_PREFIX), acc.links(attrs, RERUN_BY_PREFIX)
    for t in trials:  # retries queued before the forward link existed
        if retried_from(t) is not None:
            retried_by.setdefault(int(t.system_attrs.get("retry_history", [retried_from(t)])[-1]), t.number)
    attempts = {t.number: acc.attempts_of(t) for t in trials}
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "study": study.study_name, "storage": storage_label,
        "parent_run_id": attrs.get(PARENT_RUN_ATTR), "generated_at": _iso(now),
        "max_trials": attrs.get(MAX_TRIALS_ATTR),
        "states": {s: sum(t.state.name == s for t in trials) for s in STATES},
        "trials_total": len(trials), "original_trials": sum(not acc.is_extra(t) for t in trials),
        "running": [_running(t, attempts[t.number], now) for t in trials if t.state == TrialState.RUNNING],
        "waiting": [_waiting(t) for t in trials if t.state == TrialState.WAITING],
        "failed": _failed(trials, retried_by, rerun_by),
        "pauses": _pauses(attempts),
        "retries": [{"trial": t.number, "retry_of": retried_from(t), "state": t.state.name,
                     "reason": acc.first_line(t.user_attrs.get(RETRY_REASON_ATTR)),
                     "dead_task": _last_task(attempts.get(retried_from(t), []))}
                    for t in trials if retried_from(t) is not None],
        "reruns": [{"trial": t.number, "rerun_of": int(t.user_attrs[RERUN_OF_ATTR]), "state": t.state.name,
                    "cause": t.user_attrs.get(RERUN_CAUSE_ATTR)} for t in trials if RERUN_OF_ATTR in t.user_attrs],
        "compute": _compute(trials, attempts, now),
        "tasks": _tasks(attempts, now),
        "best": _best(trials),
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value,
                    "cause": acc.failure_cause(t, t.number in retried_by) if t.state == TrialState.FAIL else None,
                    "retry_of": retried_from(t), "retried_by": retried_by.get(t.number),
                    "rerun_of": t.user_attrs.get(RERUN_OF_ATTR), "rerun_by": rerun_by.get(t.number),
                    "run_id": t.user_attrs.get(RUN_ATTR), "attempts": attempts[t.number]} for t in trials],
    }
    return doc


def _last_task(attempts: list[dict[str, Any]]) -> str | None:
    return attempts[-1].get("task") if attempts else None


def _running(t: FrozenTrial, attempts: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """A RUNNING trial; ``stale`` when silent for longer than its worker's grace period (the worker is dead or
    stalled: the next worker's sweep fails and retries it), None when the grace period is not recorded."""
    beat = t.user_attrs.get(HEARTBEAT_ATTR)
    epochs = attempts[-1].get("epochs", []) if attempts else []
    grace = attempts[-1].get("grace_s") if attempts else None
    silent = now - acc.last_sign_of_life(t)
    return {"trial": t.number, "task": t.user_attrs.get(TASK_ATTR), "epoch": epochs[-1]["epoch"] if epochs else 0,
            "heartbeat_age_s": None if beat is None else round(now - float(beat), 1), "attempt": len(attempts),
            "grace_s": grace, "stale": None if grace is None else silent > float(grace)}


def _waiting(t: FrozenTrial) -> dict[str, Any]:
    if retried_from(t) is not None:
        kind = "retry"
    elif RERUN_OF_ATTR in t.user_attrs:
        kind = "rerun"
    elif PAUSED_AT_ATTR in t.user_attrs:
        kind = "paused"
    else:
        kind = "enqueued"
    return {"trial": t.number, "kind": kind, "since": _iso(t.user_attrs.get(PAUSED_AT_ATTR)),
            "paused_by": t.user_attrs.get(PAUSED_BY_ATTR), "retry_of": retried_from(t),
            "rerun_of": t.user_attrs.get(RERUN_OF_ATTR), "checkpoint_dir": t.user_attrs.get(CKPT_ATTR)}


def _failed(trials: list[FrozenTrial], retried_by: dict[int, int], rerun_by: dict[int, int]) -> dict[str, Any]:
    by_cause: dict[str, dict[str, Any]] = {c: {"label": label, "count": 0, "trials": []} for c, label in acc.CAUSES.items()}
    other: dict[str, list[int]] = {}
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        cause = acc.failure_cause(t, t.number in retried_by)
        by_cause[cause]["count"] += 1
        by_cause[cause]["trials"].append(t.number)
        if cause == "other":
            other.setdefault(acc.first_line(t.user_attrs.get(REASON_ATTR)), []).append(t.number)
    return {"total": sum(c["count"] for c in by_cause.values()), "by_cause": by_cause,
            "other": [{"error": error, "count": len(numbers), "trials": numbers} for error, numbers in other.items()],
            "retried_by": {str(k): v for k, v in sorted(retried_by.items())},
            "rerun_by": {str(k): v for k, v in sorted(rerun_by.items())}}


def _pauses(attempts: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    events = [{"trial": number, "task": a.get("task"), "at": _iso(a.get("end")), "attempt": a["attempt"]}
              for number, trial_attempts in attempts.items() for a in trial_attempts if a["outcome"] == "paused"]
    per_task: dict[str, int] = {}
    for event in events:
        per_task[event["task"]] = per_task.get(event["task"], 0) + 1
    return {"count": len(events), "events": events, "per_task": per_task}


def _compute(trials: list[FrozenTrial], attempts: dict[int, list[dict[str, Any]]], now: float) -> dict[str, Any]:
    flat = [a for trial_attempts in attempts.values() for a in trial_attempts]
    lost = {kind: sum(acc.lost_seconds(a) for a in flat if a["outcome"] == kind) for kind in ("paused", "dead")}
    failed_numbers = {t.number for t in trials if t.state == TrialState.FAIL}
    starts = [float(a["start"]) for a in flat]
    ends = [now if a.get("end") is None else float(a["end"]) for a in flat]
    span = (max(ends) - min(starts)) if flat else 0.0
    # Finished: a result (complete or pruned); a failed trial ended without one and is counted apart.
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and bool(attempts[t.number]) for t in trials)
    failed = sum(t.state == TrialState.FAIL and bool(attempts[t.number]) for t in trials)
    return {"attempts": len(flat), "spent_s": round(sum(acc.spent_seconds(a, now) for a in flat), 3),
            "lost_s": round(lost["paused"] + lost["dead"], 3), "lost_preempted_s": round(lost["paused"], 3),
            "lost_dead_s": round(lost["dead"], 3),
            "failed_s": round(sum(acc.spent_seconds(a, now) for n in failed_numbers for a in attempts[n]
                                  if a["outcome"] == "failed"), 3),
            "epochs": sum(len(a.get("epochs") or []) for a in flat),
            "first_start": _iso(min(starts)) if flat else None, "last_end": _iso(max(ends)) if flat else None,
            "span_s": round(span, 3), "trials_finished": finished, "trials_failed": failed,
            "trials_per_hour": round(finished / (span / 3600), 3) if span > 0 else None}


def _tasks(attempts: dict[int, list[dict[str, Any]]], now: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for trial_attempts in attempts.values():
        for a in trial_attempts:
            row = out.setdefault(str(a.get("task")), {"attempts": 0, "pauses": 0, "deaths": 0, "spent_s": 0.0,
                                                       "lost_s": 0.0, "trials": []})
            row["attempts"] += 1
            row["pauses"] += a["outcome"] == "paused"
            row["deaths"] += a["outcome"] == "dead"
            row["spent_s"] = round(row["spent_s"] + acc.spent_seconds(a, now), 3)
            row["lost_s"] = round(row["lost_s"] + acc.lost_seconds(a), 3)
            if a["trial"] not in row["trials"]:
                row["trials"].append(a["trial"])
    return dict(sorted(out.items()))


def _best(trials: list[FrozenTrial]) -> dict[str, Any] | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    return {"trial": best.number, "value": best.value, "run_id": best.user_attrs.get(RUN_ATTR)}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else str(dt.timedelta(seconds=round(value)))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def render_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(heading, text) rows: the screen of ``deepsports status`` and the rows of the markdown table."""
    s, c = doc["states"], doc["compute"]
    extras = doc["trials_total"] - doc["original_trials"]
    rows = [("study", f"{doc['study']} ({doc['storage']}), parent run {doc['parent_run_id']}, max_trials "
                      f"{doc['max_trials'] or 'none'}"),
            ("trials", f"{doc['trials_total']} ({doc['original_trials']} original, {extras} retry/re-run): "
                       + ", ".join(f"{s[k]} {k}" for k in STATES))]
    for r in doc["running"]:
        age = "no heartbeat yet" if r["heartbeat_age_s"] is None else f"heartbeat {r['heartbeat_age_s']:.0f} s ago"
        stale = (f": STALE, past the grace period of {r['grace_s']:.0f} s (its worker is dead or stalled; the next "
                 "worker of the study fails and retries it: `deepsports submit tune --missing` submits one)"
                 if r.get("stale") else "")
        rows.append(("running", f"trial {r['trial']} on {r['task']}, epoch {r['epoch']} done, {age}{stale}"))
    for w in doc["waiting"]:
        what = {"paused": f"paused by {w['paused_by']} since {w['since']}", "retry": f"queued retry of trial {w['retry_of']}",
                "rerun": f"queued re-run of trial {w['rerun_of']}", "enqueued": "enqueued"}[w["kind"]]
        rows.append(("waiting", f"trial {w['trial']}: {what}"))
    f = doc["failed"]
    for cause, group in f["by_cause"].items():
        if group["count"] and cause != "other":
            forward = [f"{n}->{f['retried_by'].get(str(n)) or f['rerun_by'].get(str(n))}" for n in group["trials"]
                       if str(n) in f["retried_by"] or str(n) in f["rerun_by"]]
            rows.append(("failed", f"{group['label']}: {group['count']} (trials {_numbers(group['trials'])})"
                                   + (f", retried/re-run as {', '.join(forward)}" if forward else "")))
    for group in f["other"]:
        rows.append(("failed", f"{group['error']}: {group['count']} (trials {_numbers(group['trials'])})"))
    p = doc["pauses"]
    if p["count"]:
        per_task = ", ".join(f"{task} {n}" for task, n in p["per_task"].items())
        rows.append(("pauses", f"{p['count']} (per task: {per_task}): "
                               + "; ".join(f"trial {e['trial']} at {e['at']}" for e in p["events"])))
    for r in doc["retries"]:
        rows.append(("retries", f"trial {r['trial']} retries {r['retry_of']} (dead on {r['dead_task']}), "
                                f"{r['state']}: {_short(r['reason'])}"))
    for r in doc["reruns"]:
        rows.append(("re-runs", f"trial {r['trial']} re-runs {r['rerun_of']} ({r['cause']}), {r['state']}"))
    rate = "n/a" if c["trials_per_hour"] is None else f"{c['trials_per_hour']:.1f}"
    rows.append(("compute", f"spent {_seconds(c['spent_s'])} in {_plural(c['attempts'], 'attempt')} "
                            f"({_plural(c['epochs'], 'epoch')}); lost "
                            f"{_seconds(c['lost_s'])} (preempted {_seconds(c['lost_preempted_s'])}, dead workers "
                            f"{_seconds(c['lost_dead_s'])}); failed trials {_seconds(c['failed_s'])}"))
    failed = f", {c['trials_failed']} failed" if c.get("trials_failed") else ""
    rows.append(("rate", f"{rate} finished trials/hour ({c['trials_finished']} complete or pruned{failed}, in "
                         f"{_seconds(c['span_s'])})"))
    for task, t in doc["tasks"].items():
        rows.append(("task", f"{task}: {_plural(t['attempts'], 'attempt')}, {t['pauses']} paused, {t['deaths']} died, spent "
                             f"{_seconds(t['spent_s'])}, lost {_seconds(t['lost_s'])}"))
    best = doc["best"]
    rows.append(("best", "none yet" if best is None else f"{best['value']:.4f} (trial {best['trial']}, run {best['run_id']})"))
    return rows


def render_text(doc: dict[str, Any]) -> str:
    return "\n".join(f"{head:<9} {text}" for head, text in render_lines(doc)) + "\n"


def render_markdown(doc: dict[str, Any]) -> str:
    rows = "\n".join(f"| {head} | {text.replace('|', '/')} |" for head, text in render_lines(doc))
    return f"# Study {doc['study']} at {doc['generated_at']}\n\n| | |\n|---|---|\n{rows}\n"


def status_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """The counts the parent run carries as metrics."""
    c = doc["compute"]
    out = {f"status_{k.lower()}": float(v) for k, v in doc["states"].items()}
    out.update(status_pauses=float(doc["pauses"]["count"]), status_retries=float(len(doc["retries"])),
               status_reruns=float(len(doc["reruns"])), compute_spent_s=float(c["spent_s"]),
               compute_lost_s=float(c["lost_s"]), compute_failed_s=float(c["failed_s"]))
    out.update({f"status_fail_{cause}": float(g["count"]) for cause, g in doc["failed"]["by_cause"].items()})
    if c["trials_per_hour"] is not None:
        out["trials_per_hour"] = float(c["trials_per_hour"])
    return out


def publish_status(study: optuna.Study, storage_label: str = "", tracker=None) -> dict[str, Any] | None:
    """Refresh the parent run: status metrics, ``study_status.json`` and ``study_status.md``."""
    from mlflow.entities import Metric

    from deepsports.errors import StorageError
    from deepsports.tracking.runs import RunTracker
    from deepsports.tracking.store import call_with_retry

    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        return None
    tracker = tracker or RunTracker()
    doc = study_status(study, storage_label)
    stamp, step = int(time.time() * 1000), doc["compute"]["trials_finished"]
    metrics = [Metric(k, v, stamp, step) for k, v in status_metrics(doc).items()]
    try:
        client = tracker.client
        call_with_retry("log study status", tracker.uri, client.log_batch, parent, metrics=metrics)
        call_with_retry("log study status", tracker.uri, client.log_text, parent,
                                 json.dumps(doc, indent=2, default=str), "study_status.json")
        call_with_retry("log study status", tracker.uri, client.log_text, parent, render_markdown(doc),
                                 "study_status.md")
    except StorageError as exc:  # bookkeeping must not stop the study
        log.warning("could not refresh the study status on the parent run: %s", exc)
        return None
    return doc


def run_attempts(study: optuna.Study, run_id: str, number: int | None = None) -> list[dict[str, Any]]:
    """Every attempt that wrote MLflow run ``run_id`` (a trial, its resumes, a dead trial's retry), oldest first;
    a dead attempt carries the reason its trial was failed with."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(RUN_ATTR) != run_id and t.number != number:
            continue
        for a in acc.attempts_of(t):
            if a["outcome"] == "dead" and not a.get("reason"):
                a["reason"] = t.user_attrs.get(REASON_ATTR) or "dead worker (stale heartbeat)"
            out.append(a)
    return sorted(out, key=lambda a: a["start"])


def record_run_attempts(study: optuna.Study, run_id: str, tracker=None, number: int | None = None
                        ) -> list[dict[str, Any]]:
    """Write the run's attempts: ``attempts.json``, the tag ``deepsports.attempts`` (how many), one tag
    ``deepsports.attempt.<i>`` each, and ``deepsports.first_failure_reason`` (never overwritten)."""
    from deepsports.errors import StorageError
    from deepsports.tags import ATTEMPTS_TAG, FIRST_FAILURE_TAG
    from deepsports.tracking.runs import RunTracker
    from deepsports.tracking.store import call_with_retry

    tracker = tracker or RunTracker()
    attempts = run_attempts(study, run_id, number)
    if not attempts:
        return attempts
    tags = {ATTEMPTS_TAG: str(len(attempts))}
    for i, a in enumerate(attempts, 1):
        tags[f"{ATTEMPT_TAG_PREFIX}{i}"] = (f"trial {a['trial']} on {a.get('task')}: {_iso(a['start'])} to "
                                           f"{_iso(a.get('end'))}, {a['outcome']}"
                                           + (f": {acc.first_line(a.get('reason'))}" if a.get("reason") else ""))
    first = next((a for a in attempts if a["outcome"] in ("failed", "dead")), None)
    client = tracker.client
    try:
        if first is not None:
            existing = call_with_retry("read run", tracker.uri, client.get_run, run_id).data.tags
            if FIRST_FAILURE_TAG not in existing:
                tags[FIRST_FAILURE_TAG] = f"trial {first['trial']} ({first['outcome']}): {first.get('reason')}"[:5000]
        for key, value in tags.items():
            call_with_retry("tag attempts", tracker.uri, client.set_tag, run_id, key, value)
        call_with_retry("log attempts", tracker.uri, client.log_text, run_id,
                                 json.dumps(attempts, indent=2), "attempts.json")
    except StorageError as exc:
        log.warning("could not record the attempts of MLflow run %s: %s", run_id, exc)
    return attempts
