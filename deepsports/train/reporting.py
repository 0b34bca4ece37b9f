"""End-of-run reporting: test evaluation with the best checkpoint, plots, predictions and the model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from deepsports.config import LOCATION_KEYS, Config
from deepsports.tags import CONFIG_TAG_PREFIX
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
            # torch.export (pt2): loads without unpickling code and without deepsports installed.
            tracker.log_model(model_cpu, example, serialization_format="pt2")
            model.to(runtime.device)
    return test_metrics
