"""End-of-run reporting: test evaluation with the best checkpoint, plots, predictions and the model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

import deepsports
from deepsports.train import plots
from deepsports.tracking import runs as tracking
from deepsports.train.checkpoints import CheckpointManager
from deepsports.config import Config
from deepsports.train.distributed import SINGLE, DistEnv
from deepsports.train.evaluation import eval_loader, make_loader, predict
from deepsports.train.runtime import Runtime

log = logging.getLogger("deepsports.train")


def log_final_artifacts(config: Config, tracker: "tracking.RunTracker", model: torch.nn.Module,
                        manager: CheckpointManager, data, runtime: Runtime, loss_fn,
                        history: list[dict[str, float]], env: DistEnv = SINGLE) -> dict[str, float]:
    """Evaluate the best checkpoint (val, and test when ``evaluate``) and log every artifact of the run.

    Returns the test metrics (empty without ``evaluate``). Under DDP every rank predicts its shards;
    rank 0 writes and logs the files (the other ranks' ``tracker`` logs nothing).
    """
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
                test_metrics = metrics
                tracker.log_metrics({f"test_{k}": v for k, v in metrics.items()}, step=config.epochs)
                log.info("test: spearman %.4f rel_l2 %.4f mse %.3f difficulty_mae %.4f", metrics["spearman"],
                         metrics["rel_l2"], metrics["mse"], metrics["difficulty_mae"])
        if config.log_checkpoint and manager.best_path.exists():
            tracker.log_artifact(manager.best_path, "checkpoints")
        if config.log_model and env.is_main:
            example = next(iter(make_loader(data.val, 1, 0)))["video"][:1]
            model_cpu = model.to("cpu").eval()
            # Ship the package with the pickled model so it loads where deepsports is not installed.
            tracker.log_model(model_cpu, example, code_paths=[str(Path(deepsports.__file__).parent)])
            model.to(runtime.device)
    return test_metrics
