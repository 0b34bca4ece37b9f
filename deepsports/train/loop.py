"""The training loop: one function that the CLI, the MLproject, Optuna studies and SLURM workers call.

A run is resumable: checkpoints (``epoch-NNNN.pt`` after every epoch, ``best.pt`` by validation
Spearman, and a mid-epoch one on preemption) hold model, optimizer, scheduler, scaler, RNG states,
config and the MLflow run id, so ``resume: auto`` continues *the same MLflow run*. Metrics are
logged after the checkpoint that contains them is on disk, and on resume any epoch the checkpoint
knows but MLflow does not is logged then: every epoch appears exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsports.config import Config, check_installed
from deepsports.data import build_datasets
from deepsports.errors import ConfigError, NonFiniteLossError, PreemptedError, TrainingError
from deepsports.model import build_model
from deepsports.slurm.env import run_tags
from deepsports.tags import (
    BEST_EPOCH_TAG,
    CHECKPOINT_DIR_TAG,
    DATASET_TAG_PREFIX,
    DEVICE_TAG,
    FAILURE_REASON_TAG,
    INTERRUPTED_TAG,
    RESUME_EXACT_TAG,
    RESUME_INEXACT_TAG,
    TOTAL_PARAMS_TAG,
    TRAINABLE_PARAMS_TAG,
    WORLD_SIZE_TAG,
)
from deepsports.tracking.runs import NullTracker, RunTracker
from deepsports.train import distributed
from deepsports.train.checkpoints import CheckpointManager, capture_rng_state, load_checkpoint
from deepsports.train.dir_lock import checkpoint_dir_lock
from deepsports.train.distributed import (
    DistEnv,
    GlobalBatchModel,
    ShardedBatchSampler,
    gather_rows,
    steps_per_epoch,
    wrap_ddp,
)
from deepsports.train.evaluation import EpochSampler, eval_loader, loader_seed, make_loader, predict
from deepsports.train.losses import aqa_loss
from deepsports.train.metric_log import EpochMetricLog, LogOnce
from deepsports.train.optim import build_optimizer, build_scheduler
from deepsports.train.reporting import log_config, log_final_artifacts
from deepsports.train.resume import find_resume, restore_state
from deepsports.train.runtime import seed_everything, select_runtime, setup_logging, warnings_only
from deepsports.train.state import (
    BestResult,
    EpochReport,
    EpochTally,
    LossFn,
    Run,
    TrainedEpoch,
    TrainHooks,
)

log = logging.getLogger(__name__)

#: Metric keys logged once per epoch (step = epoch, counted from 1).
EPOCH_METRICS = ("train_loss", "val_loss", "val_spearman", "val_rel_l2", "val_mse", "val_difficulty_mae",
                 "learning_rate", "epoch_seconds", "clips_per_s", "data_wait_fraction")


@dataclass
class TrainResult:
    run_id: str
    best_val_spearman: float
    best_epoch: int
    test_metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint_dir: Path
    resumed_from_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: The run had finished before this call: nothing was trained or logged (values from its checkpoint and MLflow).
    already_finished: bool = False


class _Progress:
    """A tqdm bar on a terminal, periodic log lines otherwise (SLURM logs, CI)."""

    def __init__(self, total: int, desc: str, every: int):
        self.every, self.total, self.desc, self.count = every, total, desc, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)

    def update(self, loss: float, start: int = 0) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.count % self.every == 0 or start + self.count == self.total:
            log.info("%s step %d/%d loss %.4f", self.desc, start + self.count, self.total, loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _loss_fn(config: Config) -> LossFn:
    return lambda out, target: aqa_loss(out, target, config.loss_mse_weight, config.loss_spcoef_weight)


def _resolve_checkpoint_dir(config: Config) -> Path | None:
    return Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None


def train(config: Config, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
          hooks: TrainHooks = TrainHooks()) -> TrainResult:
    """Train (and, with ``evaluate``, test) one configuration, tracked in MLflow.

    ``hooks``: the caller's epoch callback, stop flag and fault injection (:class:`TrainHooks`).
    """
    setup_logging(config.loglevel)
    check_installed(config)  # before any run is created
    use_cuda = config.gpu and torch.cuda.is_available()
    layout = distributed.detect()
    if config.batch_size < layout.world_size:  # checked before waiting for the other processes
        raise ConfigError(f"batch_size={config.batch_size} is the global batch and must be at least the number of "
                          f"processes ({layout.world_size})")
    if not layout.is_main:  # the other ranks only warn: rank 0 reports for all
        warnings_only()
    owns_group = not torch.distributed.is_available() or not torch.distributed.is_initialized()
    env = distributed.setup(use_cuda, config.dist_backend)
    try:
        # One process per checkpoint_dir (rank 0 speaks for its job): a second would resume the same run.
        with checkpoint_dir_lock(_resolve_checkpoint_dir(config) if env.is_main else None):
            return _train_process(config, env, hooks, parent_run_id=parent_run_id, tags=tags)
    finally:
        if owns_group:
            distributed.teardown(env)


def _finished_result(config: Config, env: DistEnv, resume_state: dict | None, resume_run_id: str | None,
                     ckpt_dir: Path | None) -> TrainResult | None:
    """Rank 0: the result of the run this call would resume when that run has FINISHED (every epoch in the
    checkpoint, status FINISHED in MLflow), else None. Test metrics come from the run as MLflow holds them."""
    if not env.is_main or resume_state is None or resume_run_id is None or ckpt_dir is None:
        return None
    if int(resume_state["step"]) != 0 or int(resume_state["epoch"]) <= config.epochs:
        return None  # epochs left to train (or more epochs asked for than were run)
    run = RunTracker().fetch_run(resume_run_id)
    if run.info.status != "FINISHED":
        return None  # killed during its final evaluation: resume finishes it
    best = BestResult.from_state(resume_state["best"])
    test = {k[len("test_"):]: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    return TrainResult(run_id=resume_run_id, best_val_spearman=best.val_spearman, best_epoch=best.epoch,
                       test_metrics=test, history=list(resume_state["history"]), checkpoint_dir=ckpt_dir,
                       resumed_from_epoch=int(resume_state["epoch"]) - 1, already_finished=True)


def _train_process(config: Config, env: DistEnv, hooks: TrainHooks, *, parent_run_id: str | None,
                   tags: dict[str, str] | None) -> TrainResult:
    ckpt_dir = _resolve_checkpoint_dir(config)
    resume_path, resume_state, resume_run_id = find_resume(config, env, ckpt_dir)
    # A re-run of a finished run: every rank returns its result without a word to MLflow.
    finished = distributed.broadcast_object(env, _finished_result(config, env, resume_state, resume_run_id, ckpt_dir))
    if finished is not None:
        log.info("run %s already finished: nothing trained or logged", finished.run_id)
        return finished
    if env.is_main:
        tracker = RunTracker()
        run_id = tracker.start(experiment_name=config.experiment_name, run_name=config.run_name or None,
                               parent_run_id=parent_run_id, run_id=resume_run_id,
                               system_metrics_interval_s=config.system_metrics_interval_s,
                               tags={**(tags or {}), **({WORLD_SIZE_TAG: str(env.world_size)}
                                                         if env.enabled else {})}, cluster=run_tags())
    # Every rank learns the run id and the checkpoint to resume from rank 0, and reads it itself.
    run_id, resume_path = distributed.broadcast_object(env, (run_id if env.is_main else None, resume_path))
    if not env.is_main:
        tracker = NullTracker(run_id)
    if not env.is_main and resume_path is not None:
        resume_state = load_checkpoint(resume_path)
    if ckpt_dir is None:
        # `deepsports demo` runs us through `mlflow run`, in the project folder: it names the user's folder.
        ckpt_dir = Path(os.environ.get("DEEPSPORTS_CHECKPOINT_ROOT") or "checkpoints") / run_id
    if resume_state is None and env.is_main:
        CheckpointManager(ckpt_dir).record_run(run_id, config.to_dict())
    try:
        result = _train_tracked(config, env, tracker, run_id, ckpt_dir, resume_path, resume_state, hooks)
    except PreemptedError:
        tracker.set_tags({INTERRUPTED_TAG: "true"})
        tracker.end("KILLED")
        raise
    except KeyboardInterrupt:
        tracker.set_tags({INTERRUPTED_TAG: "true", FAILURE_REASON_TAG: "KeyboardInterrupt"})
        tracker.end("KILLED")
        raise
    except BaseException as exc:
        status = getattr(exc, "mlflow_status", "FAILED")
        tracker.set_tags({FAILURE_REASON_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end(status)
        raise
    tracker.end("FINISHED")
    return result


def _train_tracked(config: Config, env: DistEnv, tracker: RunTracker, run_id: str, ckpt_dir: Path,
                   resume_path: Path | None, resume_state: dict | None, hooks: TrainHooks) -> TrainResult:
    run = _build_run(config, env, tracker, run_id, ckpt_dir, resume_state, hooks)
    _restore(run, resume_path, resume_state)
    for epoch in range(run.start.epoch, config.epochs + 1):
        _report_epoch(run, _train_epoch(run, epoch))

    run.tracker.set_tags({BEST_EPOCH_TAG: str(run.best.epoch)})
    run.tracker.log_metrics({"best_val_spearman": run.best.val_spearman}, step=config.epochs)
    distributed.barrier(env)  # best.pt is on disk before every rank reads it
    test_metrics = log_final_artifacts(run)
    return TrainResult(run_id=run_id, best_val_spearman=run.best.val_spearman, best_epoch=run.best.epoch,
                       test_metrics=test_metrics, history=run.history, checkpoint_dir=ckpt_dir,
                       resumed_from_epoch=(resume_state or {}).get("epoch", 1) - 1)


def _build_run(config: Config, env: DistEnv, tracker: RunTracker, run_id: str, ckpt_dir: Path,
               resume_state: dict | None, hooks: TrainHooks) -> Run:
    """Data, model, optimizer and friends, the same on every rank (seeded alike)."""
    seed_everything(config.seed, config.deterministic)  # the same seed on every rank: identical init
    device = torch.device("cuda", env.local_rank) if env.enabled and config.gpu and torch.cuda.is_available() else None
    runtime = select_runtime(config, device)
    if env.is_main:
        data = build_datasets(config, progress=True)  # rank 0 generates/caches; the others then only read
    distributed.barrier(env)
    if not env.is_main:
        data = build_datasets(config, progress=False)
    built = build_model(config)
    model = built.model
    if resume_state is None and built.fresh_head:
        model.init_output_bias(_mean_target(data.train))
    model = model.to(runtime.device)
    optimizer = build_optimizer(config, model.parameters())
    global_model = GlobalBatchModel(model, env)
    net = wrap_ddp(global_model, env, runtime.device, find_unused_parameters=config.use_decoder)
    if config.compile:
        # Only the training step: checkpoints and evaluation use the plain modules (same parameters),
        # so state_dict keys stay free of torch.compile's `_orig_mod.` prefix.
        net = torch.compile(net)
    n_steps = steps_per_epoch(len(data.train), config.batch_size, env.world_size)
    pin = runtime.device.type == "cuda"
    scheduler = build_scheduler(config, optimizer, n_steps)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    return Run(config=config, env=env, tracker=tracker, run_id=run_id, ckpt_dir=ckpt_dir, runtime=runtime, data=data,
               model=model, global_model=global_model, net=net, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, loss_fn=_loss_fn(config), manager=CheckpointManager(ckpt_dir), n_steps=n_steps, pin=pin,
               hooks=hooks)


def _restore(run: Run, resume_path: Path | None, resume_state: dict | None) -> None:
    """Load the checkpoint into the run (or log the new run's params), then tag the run and log what MLflow missed."""
    config, tracker, model, data = run.config, run.tracker, run.model, run.data
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    if resume_state is not None:
        run.inexact = restore_state(run, resume_state)
        tracker.set_tags({RESUME_EXACT_TAG: str(not run.inexact).lower(),
                          RESUME_INEXACT_TAG: "; ".join(run.inexact) or "-"})
        if run.inexact:
            log.warning("this resume is not exact: %s", "; ".join(run.inexact))
        if resume_path is not None and run.env.is_main and run.start.step == 0 and run.best.epoch == run.start.epoch - 1:
            # The resumed checkpoint is the best epoch's: a stop between its file and best.pt left an older best.pt.
            run.manager.restore_best(resume_path)
        if run.start.epoch > config.epochs:
            # An earlier attempt may have logged part of the end of the run: log each point once.
            run.tracker = tracker = LogOnce(tracker)
    else:
        log_config(tracker, config)
    tracker.set_tags({DEVICE_TAG: run.runtime.device_name,
                      CHECKPOINT_DIR_TAG: str(run.ckpt_dir.resolve()),
                      TRAINABLE_PARAMS_TAG: str(trainable), TOTAL_PARAMS_TAG: str(total_params),
                      **{f"{DATASET_TAG_PREFIX}{k}": str(v) for k, v in data.fingerprint.items()}})
    if resume_state is None:
        tracker.log_dict(data.split, "split.json")
        tracker.log_text(config.to_yaml(), "config.yaml")
    # Epochs the checkpoint holds but MLflow missed (killed between checkpoint and logging).
    run.epoch_log = EpochMetricLog(tracker, EPOCH_METRICS)
    for row in run.history:
        run.epoch_log.log(row, int(row["epoch"]))
    log.info("run %s: %d train / %d val / %d test clips, %s trainable of %s parameters, device %s", run.run_id,
             len(data.train), len(data.val), len(data.test), f"{trainable:,}", f"{total_params:,}",
             run.runtime.device_name)


def _checkpoint_state(run: Run, epoch: int, step: int, tally: EpochTally | None) -> dict | None:
    """On every rank (a collective): rank 0's checkpoint contents with every rank's RNG state; None elsewhere."""
    rng_ranks = distributed.all_gather_object(run.env, capture_rng_state())
    return run.state(epoch, step, tally, rng_ranks) if run.env.is_main else None


def _train_epoch(run: Run, epoch: int) -> TrainedEpoch:
    """The optimisation steps of one epoch (from the checkpoint's step when resuming mid-epoch).

    Raises :class:`PreemptedError` after writing a mid-epoch checkpoint when a stop was requested.
    """
    config, env, runtime, data, model, optimizer = run.config, run.env, run.runtime, run.data, run.model, run.optimizer
    hooks = run.hooks
    resuming = epoch == run.start.epoch and run.start.step > 0
    first_step = run.start.step if resuming else 0
    tally = run.start.tally if resuming else EpochTally()
    data.train.set_epoch(epoch)  # augmentation and frame sampling: drawn per clip from (seed, epoch, clip index)
    # Skipping the steps done: the epoch's order is a function of (seed, epoch), so the rest is the same.
    order = EpochSampler(len(data.train), config.seed, epoch, start=first_step * config.batch_size)
    batches = ShardedBatchSampler(list(order), config.batch_size, env, train=True)
    loader = make_loader(data.train, config.batch_size, config.num_workers, batch_sampler=batches,
                         pin_memory=run.pin, seed=loader_seed(config.seed, epoch))
    run.net.train()
    progress = _Progress(run.n_steps, f"epoch {epoch}/{config.epochs}", config.log_every_steps)
    tick = time.perf_counter()
    step = first_step
    asked = time.perf_counter()  # when the loop asked the loader for the next batch
    try:
        for batch, sizes in zip(loader, batches.global_sizes):
            # Time the training waited for data (worker start-up included): ~0 when the loader keeps up.
            tally.data_wait_s += time.perf_counter() - asked
            video = runtime.video_input(batch["video"])
            target = gather_rows(batch["target"].to(runtime.device, non_blocking=True), sizes, env)
            hooks.fault("step", step)
            with runtime.autocast():
                out = run.net(video, sizes)  # the whole global batch's outputs, on every rank
            loss, _ = run.loss_fn(out.float(), target)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {float(loss.detach())} at epoch {epoch} step {step + 1} "
                                         f"(learning_rate={config.learning_rate}); try a lower learning rate")
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            if config.grad_clip_norm > 0:
                run.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            run.scaler.step(optimizer)
            run.scaler.update()
            run.scheduler.step()
            step += 1
            tally.loss_sum += float(loss.detach()) * len(target)
            tally.clips += len(target)
            if env.is_main:
                progress.update(float(loss.detach()), first_step)
            if _stop(env, hooks.stop_requested, runtime.device) and step < run.n_steps:
                so_far = dataclasses.replace(tally, seconds=tally.seconds + time.perf_counter() - tick)
                state = _checkpoint_state(run, epoch, step, so_far)
                path = run.manager.save_partial(epoch, state) if state is not None else run.ckpt_dir
                raise PreemptedError(f"stop requested at epoch {epoch} step {step}/{run.n_steps}; checkpoint {path}")
            asked = time.perf_counter()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory at epoch {epoch} step {step + 1} (batch_size={config.batch_size}, "
                            f"frame_num={config.frame_num}, spatial_size={config.spatial_size}): {exc}") from exc
    finally:
        progress.close()
    return TrainedEpoch(epoch=epoch, tally=tally, started=tick,
                        train_seconds=tally.seconds + time.perf_counter() - tick)


def _report_epoch(run: Run, trained: TrainedEpoch) -> None:
    """Validate, checkpoint, then log the epoch (in that order: nothing logged that is not on disk)."""
    config, env, runtime, hooks, epoch, tally = run.config, run.env, run.runtime, run.hooks, trained.epoch, trained.tally
    train_seconds = trained.train_seconds
    hooks.fault("validate", epoch)
    val = predict(run.global_model, eval_loader(run.data.val, config.batch_size, config.num_workers, env, run.pin),
                  runtime, run.loss_fn, env)
    val_metrics = val.metrics()
    epoch_seconds = time.perf_counter() - trained.started + tally.seconds
    row = {"epoch": epoch, "train_loss": tally.train_loss, "val_loss": val_metrics["loss"],
           "val_spearman": val_metrics["spearman"], "val_rel_l2": val_metrics["rel_l2"], "val_mse": val_metrics["mse"],
           "val_difficulty_mae": val_metrics["difficulty_mae"], "learning_rate": run.optimizer.param_groups[0]["lr"],
           "epoch_seconds": epoch_seconds, "clips_per_s": tally.clips / max(train_seconds, 1e-9),
           "data_wait_fraction": min(1.0, tally.data_wait_s / max(train_seconds, 1e-9))}
    run.history.append(row)
    is_best = row["val_spearman"] > run.best.val_spearman
    if is_best:
        run.best = BestResult(val_spearman=row["val_spearman"], epoch=epoch)
    hooks.fault("checkpoint", epoch)
    state = _checkpoint_state(run, epoch + 1, 0, None)
    if state is not None:
        run.manager.save(epoch, state, is_best=is_best, written=lambda: hooks.fault("checkpoint_written", epoch))
    hooks.fault("log", epoch)
    run.epoch_log.log(row, epoch)  # once per step, also when resumed from an older checkpoint
    log.info("epoch %d/%d: train_loss %.4f val_loss %.4f val_spearman %.4f (%.1f clips/s, %.1f s, %.0f%% of it "
             "waiting for data)", epoch, config.epochs, row["train_loss"], row["val_loss"], row["val_spearman"],
             row["clips_per_s"], epoch_seconds, 100 * row["data_wait_fraction"])
    if hooks.epoch_callback is not None:  # before a stop: a study's pruner sees every epoch when it ends
        hooks.epoch_callback(EpochReport(epoch=epoch, metrics={k: row[k] for k in EPOCH_METRICS}, run_id=run.run_id))
    if _stop(env, hooks.stop_requested, runtime.device) and epoch < config.epochs:
        raise PreemptedError(f"stop requested after epoch {epoch}; checkpoint in {run.ckpt_dir}")


def _stop(env: DistEnv, stop_requested: Callable[[], bool] | None, device: torch.device) -> bool:
    """Whether to stop now; under DDP every rank stops at the same step when any rank was asked to."""
    if stop_requested is None:  # the same on every rank: no collective needed
        return False
    asked = stop_requested()
    return distributed.any_rank(env, asked, device) if env.enabled else asked


def _mean_target(dataset) -> torch.Tensor:
    """Mean of the training targets ``[final/difficulty/30, difficulty]`` (from the annotations, no video)."""
    from deepsports.data.dataset import clip_target

    return torch.stack([clip_target(c.final_score, c.difficulty) for c in dataset.clips]).mean(0)


def load_training_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (weights only)."""
    return load_checkpoint(path)
