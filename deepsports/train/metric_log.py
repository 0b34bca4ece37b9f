"""Metrics logged at most once per step in a run, also across the resumes of a run (MLflow cannot delete a point)."""

from __future__ import annotations

import logging

from deepsports.tags import MODEL_URI_TAG
from deepsports.tracking.runs import NullTracker, RunTracker

log = logging.getLogger(__name__)


class LogOnce:
    """A tracker that logs each metric point (key, step) and the model at most once in its run.

    The end of a run resumed after its last epoch (an earlier attempt was stopped during its final
    evaluation) logs through it: what that attempt logged stays, nothing is logged twice. Everything
    else (tags, artifacts: the same names are overwritten) goes to the wrapped tracker unchanged.
    """

    def __init__(self, tracker: RunTracker | NullTracker):
        self._tracker = tracker
        self._steps: dict[str, set[int]] = {}

    def __getattr__(self, name: str):
        return getattr(self._tracker, name)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        for key in metrics:
            if key not in self._steps:
                self._steps[key] = self._tracker.logged_steps(key)
        fresh = {k: v for k, v in metrics.items() if step not in self._steps[k]}
        if len(fresh) < len(metrics):
            log.info("%d metric(s) at step %d were logged by an earlier attempt: not logging them again",
                     len(metrics) - len(fresh), step)
        if fresh:
            self._tracker.log_metrics(fresh, step, timestamp_ms)
            for key in fresh:
                self._steps[key].add(step)

    def log_model(self, model, example_input, **kwargs):
        run = self._tracker.fetch_run()
        if run is not None and run.data.tags.get(MODEL_URI_TAG):
            log.info("the model was logged by an earlier attempt: not logging it again")
            return run.data.tags[MODEL_URI_TAG]
        return self._tracker.log_model(model, example_input, **kwargs)


class EpochMetricLog:
    """Logs each per-epoch metric at most once per step, also across resumes.

    MLflow cannot delete a metric point. A run resumed from an older checkpoint than its newest
    logged epoch (the newest checkpoint was truncated, corrupt or deleted) trains those epochs again;
    their first logged values stay and the re-run's are not logged (the log says so). An epoch the
    checkpoint holds but MLflow missed (killed between checkpoint and logging) is logged on resume.
    """

    def __init__(self, tracker: RunTracker, keys: tuple[str, ...]):
        self.tracker, self.keys = tracker, keys
        # One query per key on a resumed run: any key may hold steps the others lack (an older version's
        # logging, a failed batch); a fresh run answers with empty histories.
        self.logged = {key: tracker.logged_steps(key) for key in keys}

    def log(self, row: dict[str, float], epoch: int) -> None:
        fresh = {key: row[key] for key in self.keys if epoch not in self.logged[key]}
        if len(fresh) < len(self.keys):
            log.info("epoch %d was logged before the checkpoint this run resumed from: keeping the values logged "
                     "then for %d metric(s), not logging the re-run's", epoch, len(self.keys) - len(fresh))
        if fresh:
            self.tracker.log_metrics(fresh, step=epoch)
            for key in fresh:
                self.logged[key].add(epoch)
