"""``deepsports evaluate``: score a run's checkpoint again, as a new MLflow run linked to it.

The source is an MLflow run id (its logged ``checkpoints/best.pt`` artifact, else ``best.pt`` in
the run's ``deepsports.checkpoint_dir``), a checkpoint file, or a checkpoint directory (its
``best.pt``). The checkpoint's own config rebuilds the model and the data, and the evaluation goes
through the very functions the end of ``train`` uses (:func:`~deepsports.train.evaluation.predict`,
:func:`~deepsports.train.quality.assess`), so with the same code and data the test metrics equal the
ones the training run logged, to the last bit.

The new run is a child of the source run (when that run is in this tracking store), tagged
``deepsports.evaluation_of_run``, and logs ``<split>_...`` metrics at the checkpoint's epoch, the
predictions, the scatter plot and the per-group table.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepsports.config import Config, build_config, check_writable_dirs
from deepsports.errors import CheckpointError, ConfigError, StorageError
from deepsports.tags import (
    CHECKPOINT_DIR_TAG,
    EVALUATED_CHECKPOINT_TAG,
    EVALUATED_EPOCH_TAG,
    EVALUATED_MODEL_TAG,
    EVALUATED_SPLIT_TAG,
    EVALUATION_OF_RUN_TAG,
)

log = logging.getLogger(__name__)

SPLITS = ("test", "val")

#: Config keys ``evaluate`` may override: where the data and cache are, and how to run. None of them
#: changes a prediction (``batch_size`` changes only the loss, whose Spearman term spans the batch).
MAY_OVERRIDE = frozenset({"num_workers", "gpu", "cache_dir", "root_dir", "annotation_path", "train_path",
                          "test_path", "loglevel", "batch_size", "experiment_name", "pretrained_model"})

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_REGISTERED = re.compile(r"models:/[^/@]+(@[^/@]+|/[0-9]+)")


@dataclass
class EvaluationResult:
    run_id: str
    source_run_id: str | None
    #: The evaluated checkpoint as it stays: a file's absolute path, or ``runs:/<id>/checkpoints/best.pt`` for
    #: a logged artifact (its downloaded copy is deleted when ``evaluate`` returns).
    checkpoint: str
    split: str
    epoch: int
    metrics: dict[str, float]
    #: ``<split>_...`` metrics of the source run that differ from this evaluation (logged, now).
    differs_from_logged: dict[str, tuple[float, float]] = field(default_factory=dict)


def _source_run(tracker, run_id: str):
    from mlflow.exceptions import MlflowException

    from deepsports.tracking.store import call_with_retry

    try:
        return call_with_retry("get run", tracker.uri, tracker.client.get_run, run_id, policy=tracker.retry)
    except StorageError as exc:
        if isinstance(exc.__cause__, MlflowException) and exc.__cause__.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def check_source_form(source: str) -> None:
    """``source`` is an existing path, has the form of a run id (32 hex digits), or names a registered model."""
    if _REGISTERED.fullmatch(source):
        return
    if not Path(source).expanduser().exists() and not _RUN_ID.fullmatch(source):
        raise ConfigError(f"evaluate: {source!r} is neither a checkpoint file or directory nor an MLflow run id "
                          f"(32 hex digits), nor a registered model (models:/NAME@ALIAS or models:/NAME/VERSION)")


def resolve_checkpoint(source: str, tracker, download_dir: Path) -> tuple[Path, Any]:
    """(checkpoint path, source MLflow run or None) of ``source`` (a path or a run id)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "best.pt"
        if not path.is_file():
            raise ConfigError(f"evaluate: directory {source!r} holds no best.pt: pass a checkpoint file or a run id")
    if path.is_file():
        return path, None
    check_source_form(source)
    run = _source_run(tracker, source)
    if run is None:
        from deepsports.tracking.uris import redact_uri

        raise ConfigError(f"evaluate: run {source!r} is not in the tracking store {redact_uri(tracker.uri)}")
    from deepsports.tracking.store import call_with_retry

    artifacts = call_with_retry("list artifacts", tracker.uri, tracker.client.list_artifacts, source, "checkpoints",
                                policy=tracker.retry)
    if any(item.path == "checkpoints/best.pt" for item in artifacts):
        local = call_with_retry("download checkpoint", tracker.uri, tracker.client.download_artifacts, source,
                                "checkpoints/best.pt", str(download_dir), policy=tracker.retry)
        return Path(local), run
    ckpt_dir = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if ckpt_dir and (Path(ckpt_dir) / "best.pt").is_file():
        return Path(ckpt_dir) / "best.pt", run
    raise ConfigError(f"evaluate: run {source} logged no checkpoints/best.pt and its checkpoint_dir "
                      f"{ckpt_dir or '(none)'} holds none: it has nothing to evaluate")


def checkpoint_config(state: Mapping[str, Any], path: Path, overrides: Mapping[str, Any]) -> Config:
    """The checkpoint's config with ``overrides`` (only keys of :data:`MAY_OVERRIDE`)."""
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a DeepSports training checkpoint (no config or model in it)")
    refused = sorted(set(overrides) - MAY_OVERRIDE)
    if refused:
        raise ConfigError(f"evaluate: {', '.join(refused)} cannot be overridden (it would change the model or the "
                          f"data being evaluated); allowed: {', '.join(sorted(MAY_OVERRIDE))}")
    return build_config({**state["config"], **overrides})


def evaluate(source: str, split: str = "test", overrides: Mapping[str, Any] | None = None,
             n_resamples: int | None = None) -> EvaluationResult:
    """Evaluate ``source`` (run id, checkpoint, or a registered model ``models:/NAME@ALIAS`` /
    ``models:/NAME/VERSION``: the checkpoint of the run that logged it) on ``split`` and log it as a new MLflow run."""
    from deepsports.train.metrics import BOOTSTRAP_RESAMPLES

    if split not in SPLITS:
        raise ConfigError(f"evaluate: --split {split!r} is not allowed: expected one of {', '.join(SPLITS)}")
    resamples = BOOTSTRAP_RESAMPLES if n_resamples is None else n_resamples
    if resamples < 100:
        raise ConfigError(f"evaluate: --resamples {resamples} is too few for a 95 % interval: expected >= 100")
    model_uri = None
    if source.startswith("models:/"):  # a registered version (models:/NAME@champion): the run that logged it
        from deepsports.tracking.registry import resolve_registered_run

        model_uri, source = source, resolve_registered_run(source)
    check_source_form(source)  # before opening the store: a typo fails fast
    from deepsports.slurm.env import run_tags
    from deepsports.tracking.runs import RunTracker

    tracker = RunTracker()
    with tempfile.TemporaryDirectory(prefix="deepsports-evaluate-") as tmp:
        tmp_dir = Path(tmp)
        path, run = resolve_checkpoint(source, tracker, tmp_dir / "download")
        # torch (seconds) only now: an unknown run id is refused before
        from deepsports.train.checkpoints import load_checkpoint
        from deepsports.train.reporting import log_config

        where = str(path.resolve()) if run is None else f"runs:/{run.info.run_id}/checkpoints/best.pt"
        state = load_checkpoint(path)
        config = checkpoint_config(state, path, overrides or {})
        check_writable_dirs(cache_dir=config.cache_dir, what="evaluate: ")  # before the run exists
        source_run_id = run.info.run_id if run is not None else state.get("mlflow_run_id")
        if run is None and source_run_id:
            run = _source_run(tracker, source_run_id)
        epoch = int(state.get("epoch", 1)) - 1  # the state resumes *at* ``epoch``: it holds the one before
        tags = {EVALUATION_OF_RUN_TAG: source_run_id or "unknown", EVALUATED_SPLIT_TAG: split,
                EVALUATED_CHECKPOINT_TAG: where,
                EVALUATED_EPOCH_TAG: str(epoch), **({EVALUATED_MODEL_TAG: model_uri} if model_uri else {})}
        experiment = config.experiment_name
        if run is not None:
            experiment = tracker.client.get_experiment(run.info.experiment_id).name
        tracker.start(experiment_name=experiment, run_name=f"evaluate-{split}-{(source_run_id or 'ckpt')[:8]}",
                      parent_run_id=run.info.run_id if run is not None else None, tags=tags, cluster=run_tags())
        with tracker:
            log_config(tracker, config)
            metrics = _predict_and_log(config, state, split, tracker, epoch, tmp_dir, resamples)
    logged = run.data.metrics if run is not None else {}
    differs = {k: (logged[f"{split}_{k}"], v) for k, v in metrics.items()
               if f"{split}_{k}" in logged and logged[f"{split}_{k}"] != v}
    return EvaluationResult(run_id=tracker.run_id, source_run_id=source_run_id, checkpoint=where, split=split,
                            epoch=epoch, metrics=metrics, differs_from_logged=differs)


def _predict_and_log(config: Config, state: Mapping[str, Any], split: str, tracker, epoch: int, tmp_dir: Path,
                     n_resamples: int) -> dict[str, float]:
    """The end of ``train``'s evaluation of one split, on the checkpoint's weights."""
    from deepsports.data import build_datasets
    from deepsports.model import build_model
    from deepsports.train import plots, quality
    from deepsports.train.evaluation import eval_loader, predict
    from deepsports.train.losses import aqa_loss
    from deepsports.train.runtime import seed_everything, select_runtime, setup_logging

    setup_logging(config.loglevel)
    seed_everything(config.seed, config.deterministic)  # the same algorithm choices as the training run
    runtime = select_runtime(config, None)
    data = build_datasets(config, progress=True)
    dataset = data.test if split == "test" else data.val
    model = build_model(config).model
    model.load_state_dict(state["model"])
    model = model.to(runtime.device)
    loader = eval_loader(dataset, config.batch_size, config.num_workers, pin_memory=runtime.device.type == "cuda")
    preds = predict(model, loader, runtime,
                    lambda out, target: aqa_loss(out, target, config.loss_mse_weight, config.loss_spcoef_weight))
    report = quality.assess(preds, dataset.clips, n_resamples=n_resamples)
    quality.log_report(tracker, split, report, epoch, tmp_dir, n_resamples)
    csv_path = plots.write_predictions_csv(preds.rows(), tmp_dir / f"predictions_{split}.csv")
    tracker.log_artifact(csv_path, "predictions")
    scatter = plots.plot_scatter(preds.true_score, preds.pred_score, tmp_dir / f"scatter_{split}.png",
                                 title=f"{split}: Spearman {report.metrics['spearman']:.3f} (epoch {epoch})")
    tracker.log_artifact(scatter, "plots")
    log.info("%s: spearman %s", split, quality.summary_line(report.prefixed(split), split))
    return report.metrics
