"""End-of-run reporting: test evaluation with the best checkpoint, plots, predictions and the model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import deepsports
from deepsports.config import LOCATION_KEYS, Config
from deepsports.tags import CONFIG_TAG_PREFIX, MODEL_URI_TAG
from deepsports.tracking import runs as tracking
from deepsports.train import plots, quality
from deepsports.train.evaluation import eval_loader, make_loader, predict

if TYPE_CHECKING:
    from deepsports.train.state import Run

log = logging.getLogger(__name__)


def log_config(tracker, config: Config, leave_out: tuple[str, ...] = ()) -> None:
    """Config keys as params, as ``train`` logs them: the location keys as ``deepsports.config.<key>`` tags."""
    params = {k: v for k, v in config.to_params().items() if k not in leave_out}
    tracker.log_params({k: v for k, v in params.items() if k not in LOCATION_KEYS})
    tracker.set_tags({f"{CONFIG_TAG_PREFIX}{k}": params[k] for k in LOCATION_KEYS if k in params})


def log_final_artifacts(run: Run) -> dict[str, float]:
    """Evaluate the run's best checkpoint (val, and test when ``evaluate``) and log every artifact of the run.

    Returns the test metrics (empty without ``evaluate``). Under DDP every rank predicts its shards;
    rank 0 writes and logs the files (the other ranks' ``tracker`` logs nothing).
    """
    config, tracker, model, manager, data = run.config, run.tracker, run.model, run.manager, run.data
    runtime, loss_fn, history, env = run.runtime, run.loss_fn, run.history, run.env
    best = manager.best()
    if best is not None:
        model.load_state_dict(best["model"])
    with tempfile.TemporaryDirectory(prefix="deepsports-report-") as tmp:
        tmp_dir = Path(tmp)
        curves = tmp_dir / Path(config.output).name
        if env.is_main:
            plots.plot_curves(history, curves)
            tracker.log_artifact(curves, "plots")
        splits = {"val": data.val}
        if config.evaluate:
            splits["test"] = data.test
        test_metrics: dict[str, float] = {}
        for name, dataset in splits.items():
            loader = eval_loader(dataset, config.batch_size, config.num_workers, env, runtime.device.type == "cuda")
            preds = predict(model, loader, runtime, loss_fn, env)
            metrics = preds.metrics()
            if not env.is_main:
                test_metrics = metrics if name == "test" else test_metrics
                continue
            csv_path = tmp_dir / f"predictions_{name}.csv"
            plots.write_predictions_csv(preds.rows(), csv_path)
            tracker.log_artifact(csv_path, "predictions")
            scatter = tmp_dir / f"scatter_{name}.png"
            plots.plot_scatter(preds.true_score, preds.pred_score, scatter,
                               title=f"{name}: Spearman {metrics['spearman']:.3f} (best epoch)")
            tracker.log_artifact(scatter, "plots")
            if name == "test":
                # Both protocols, bootstrap intervals and the per-group table, on these same predictions.
                report = quality.assess(preds, dataset.clips)
                test_metrics = report.metrics
                quality.log_report(tracker, "test", report, config.epochs, tmp_dir)
                log.info("test: spearman %s rel_l2 %.4f mse %.3f difficulty_mae %.4f",
                         quality.summary_line(report.prefixed("test")), metrics["rel_l2"], metrics["mse"],
                         metrics["difficulty_mae"])
        run.hooks.fault("final", config.epochs)  # the metrics are logged, the files not yet
        if config.log_checkpoint and manager.best_path.exists():
            tracker.log_artifact(manager.best_path, "checkpoints")
        if config.log_model and env.is_main:
            example = runtime.video_input(next(iter(make_loader(data.val, 1, 0)))["video"][:1]).cpu()
            model_cpu = model.to("cpu").eval()
            # Ship the package with the pickled model so it loads where deepsports is not installed.
            tracker.log_model(model_cpu, example, code_paths=[str(Path(deepsports.__file__).parent)])
            model.to(runtime.device)
    return test_metrics


class LogOnce:
    """A tracker that logs each metric point (key, step) and the model at most once in its run.

    The end of a run resumed after its last epoch (an earlier attempt was stopped during its final
    evaluation) logs through it: what that attempt logged stays, nothing is logged twice. Everything
    else (tags, artifacts: the same names are overwritten) goes to the wrapped tracker unchanged.
    """

    def __init__(self, tracker: tracking.RunTracker | tracking.NullTracker):
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

    def __init__(self, tracker: tracking.RunTracker, keys: tuple[str, ...]):
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
