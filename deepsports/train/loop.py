"""The training loop: one function that the CLI, the MLproject, Optuna studies and SLURM workers call.

A run is resumable: checkpoints (``epoch-NNNN.pt`` after every epoch, ``best.pt`` by validation
Spearman, and a mid-epoch one on preemption) hold model, optimizer, scheduler, scaler, RNG states,
config and the MLflow run id, so ``resume: auto`` continues *the same MLflow run*. Metrics are
logged after the checkpoint that contains them is on disk, and on resume any epoch the checkpoint
knows but MLflow does not is logged then: every epoch appears exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deepsports.train import distributed

from deepsports.tracking import runs as tracking
from deepsports.train.checkpoints import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from deepsports.config import Config, build_config, check_installed
from deepsports.data import build_datasets
from deepsports.train.distributed import DistEnv, GlobalBatchModel, ShardedBatchSampler, gather_rows, steps_per_epoch, wrap_ddp
from deepsports.errors import CheckpointError, ConfigError, NonFiniteLossError, PreemptedError, TrainingError
from deepsports.train.evaluation import EpochSampler, eval_loader, make_loader, predict
from deepsports.train.losses import aqa_loss
from deepsports.model import build_model
from deepsports.train.optim import build_optimizer, build_scheduler
from deepsports.train.dir_lock import checkpoint_dir_lock
from deepsports.train.reporting import EpochMetricLog, log_config, log_final_artifacts
from deepsports.train.runtime import select_runtime, seed_everything, setup_logging

log = logging.getLogger("deepsports.train")

#: Metric keys logged once per epoch (step = epoch, counted from 1).
EPOCH_METRICS = ("train_loss", "val_loss", "val_spearman", "val_rel_l2", "val_mse", "val_difficulty_mae",
                 "learning_rate", "epoch_seconds", "clips_per_s", "data_wait_fraction")


#: Keys that may differ between a checkpoint and the config resuming it (they do not change the maths
#: of the epochs already done): more epochs, other workers, logging and the final evaluation.
RESUME_MAY_CHANGE = frozenset({"epochs", "num_workers", "compile", "loglevel", "log_every_steps", "gpu", "evaluate",
                               "log_model", "log_checkpoint", "run_name", "resume", "checkpoint_dir", "cache_dir", "dist_backend",
                               "system_metrics_interval_s"})


@dataclass
class EpochReport:
    """What the epoch callback sees after each epoch (``metrics`` holds :data:`EPOCH_METRICS`)."""

    epoch: int
    metrics: dict[str, float]
    run_id: str


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


def _loss_fn(config: Config):
    return lambda out, target: aqa_loss(out, target, config.loss_mse_weight, config.loss_spcoef_weight)


def _resolve_checkpoint_dir(config: Config) -> Path | None:
    return Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None


@dataclass(frozen=True)
class TrainHooks:
    """What a caller plugs into the loop (each optional); :func:`train` documents when each is called."""

    epoch_callback: Callable[[EpochReport], None] | None = None
    stop_requested: Callable[[], bool] | None = None
    fault_hook: Callable[[str, int], None] | None = None

    def fault(self, where: str, step: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(where, step)


def train(config: Config, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
          epoch_callback: Callable[[EpochReport], None] | None = None,
          stop_requested: Callable[[], bool] | None = None,
          fault_hook: Callable[[str, int], None] | None = None) -> TrainResult:
    """Train (and, with ``evaluate``, test) one configuration, tracked in MLflow.

    ``epoch_callback`` runs after each epoch's checkpoint and metrics; an exception it raises stops
    the run, whose MLflow status is the exception's ``mlflow_status`` attribute (default FAILED).
    ``stop_requested`` is polled after every step: when it returns true a checkpoint is written, the
    run is marked interrupted (KILLED) and :class:`PreemptedError` is raised. ``fault_hook(where,
    step)`` is called at named points of the loop; tests use it to inject faults.
    """
    setup_logging(config.loglevel)
    check_installed(config)  # before any run is created
    use_cuda = config.gpu and torch.cuda.is_available()
    layout = distributed.detect()
    if config.batch_size < layout.world_size:  # checked before waiting for the other processes
        raise ConfigError(f"batch_size={config.batch_size} is the global batch and must be at least the number of "
                          f"processes ({layout.world_size})")
    if not layout.is_main:  # the other ranks only warn: rank 0 reports for all
        logging.getLogger("deepsports").setLevel(max(logging.WARNING, logging.getLogger("deepsports").level))
    owns_group = not torch.distributed.is_available() or not torch.distributed.is_initialized()
    env = distributed.setup(use_cuda, config.dist_backend)
    hooks = TrainHooks(epoch_callback=epoch_callback, stop_requested=stop_requested, fault_hook=fault_hook)
    try:
        # One process per checkpoint_dir (rank 0 speaks for its job): a second would resume the same run.
        with checkpoint_dir_lock(_resolve_checkpoint_dir(config) if env.is_main else None):
            return _train_process(config, env, hooks, parent_run_id=parent_run_id, tags=tags)
    finally:
        if owns_group:
            distributed.teardown(env)


def _find_resume(config: Config, env: DistEnv, ckpt_dir: Path | None) -> tuple[Path | None, dict | None, str | None]:
    """Rank 0: the checkpoint to resume from, its state and the MLflow run to continue (each may be None)."""
    resume_path, resume_state, resume_run_id = None, None, None
    if env.is_main and ckpt_dir is not None and config.resume == "auto":
        manager = CheckpointManager(ckpt_dir)
        found = manager.latest_valid()
        if found is not None:
            resume_path, resume_state = found
            log.info("resuming from %s", resume_path)
            _check_same_config(resume_path, resume_state["config"], config)
            resume_run_id = resume_state.get("mlflow_run_id")
        elif (record := manager.recorded_run()) is not None:
            # Killed before the first checkpoint: continue its MLflow run from epoch 1, not a second run.
            _check_same_config(manager.run_record_path, record.get("config") or {}, config)
            resume_run_id = record["mlflow_run_id"]
            log.info("restarting MLflow run %s from epoch 1 (no checkpoint yet)", resume_run_id)
    return resume_path, resume_state, resume_run_id


def _train_process(config: Config, env: DistEnv, hooks: TrainHooks, *, parent_run_id: str | None,
                   tags: dict[str, str] | None) -> TrainResult:
    ckpt_dir = _resolve_checkpoint_dir(config)
    resume_path, resume_state, resume_run_id = _find_resume(config, env, ckpt_dir)
    if env.is_main:
        tracker = tracking.RunTracker()
        run_id = tracker.start(experiment_name=config.experiment_name, run_name=config.run_name or None,
                               parent_run_id=parent_run_id, run_id=resume_run_id,
                               system_metrics_interval_s=config.system_metrics_interval_s,
                               tags={**(tags or {}), **({"deepsports.world_size": str(env.world_size)}
                                                         if env.enabled else {})})
    # Every rank learns the run id and the checkpoint to resume from rank 0, and reads it itself.
    run_id, resume_path = distributed.broadcast_object(env, (run_id if env.is_main else None, resume_path))
    if not env.is_main:
        tracker = tracking.NullTracker(run_id)
    if not env.is_main and resume_path is not None:
        resume_state = load_checkpoint(resume_path)
    if ckpt_dir is None:
        # `deepsports demo` runs us through `mlflow run`, in the project folder: it names the user's folder.
        ckpt_dir = Path(os.environ.get("DEEPSPORTS_CHECKPOINT_ROOT") or "checkpoints") / run_id
    if resume_state is None and env.is_main:
        CheckpointManager(ckpt_dir).record_run(run_id, config.to_dict())
    try:
        result = _train_tracked(config, env, tracker, run_id, ckpt_dir, resume_state, hooks)
    except PreemptedError:
        tracker.set_tags({"deepsports.interrupted": "true"})
        tracker.end("KILLED")
        raise
    except KeyboardInterrupt:
        tracker.set_tags({"deepsports.interrupted": "true", "deepsports.failure_reason": "KeyboardInterrupt"})
        tracker.end("KILLED")
        raise
    except BaseException as exc:
        status = getattr(exc, "mlflow_status", "FAILED")
        tracker.set_tags({"deepsports.failure_reason": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.end(status)
        raise
    tracker.end("FINISHED")
    return result


@dataclass
class _Run:
    """One run's parts (built once by :func:`_build_run`) and its progress (updated epoch by epoch)."""

    config: Config
    env: DistEnv
    tracker: "tracking.RunTracker"
    run_id: str
    ckpt_dir: Path
    runtime: Any
    data: Any
    model: torch.nn.Module
    global_model: GlobalBatchModel
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Callable
    manager: CheckpointManager
    n_steps: int
    pin: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_spearman": -math.inf, "epoch": 0})
    start_epoch: int = 1
    start_step: int = 0
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "clips": 0, "seconds": 0.0})
    epoch_log: EpochMetricLog | None = None  # set by _restore: what MLflow already holds

    def state(self, epoch: int, step: int, partial_now: dict | None) -> dict:
        """The checkpoint's contents."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": capture_rng_state(), "config": self.config.to_dict(), "mlflow_run_id": self.run_id,
                "epoch": epoch, "step": step, "partial": partial_now, "history": self.history, "best": self.best}


def _train_tracked(config: Config, env: DistEnv, tracker: "tracking.RunTracker", run_id: str, ckpt_dir: Path,
                   resume_state: dict | None, hooks: TrainHooks) -> TrainResult:
    run = _build_run(config, env, tracker, run_id, ckpt_dir, resume_state)
    _restore(run, resume_state)
    for epoch in range(run.start_epoch, config.epochs + 1):
        acc, tick, train_seconds = _train_epoch(run, epoch, hooks)
        _report_epoch(run, epoch, acc, tick, train_seconds, hooks)

    tracker.set_tags({"deepsports.best_epoch": str(run.best["epoch"])})
    tracker.log_metrics({"best_val_spearman": run.best["val_spearman"]}, step=config.epochs)
    distributed.barrier(env)  # best.pt is on disk before every rank reads it
    test_metrics = log_final_artifacts(config, tracker, run.model, run.manager, run.data, run.runtime, run.loss_fn,
                                       run.history, env)
    return TrainResult(run_id=run_id, best_val_spearman=run.best["val_spearman"], best_epoch=run.best["epoch"],
                       test_metrics=test_metrics, history=run.history, checkpoint_dir=ckpt_dir,
                       resumed_from_epoch=(resume_state or {}).get("epoch", 1) - 1)


def _build_run(config: Config, env: DistEnv, tracker: "tracking.RunTracker", run_id: str, ckpt_dir: Path,
               resume_state: dict | None) -> _Run:
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
    return _Run(config=config, env=env, tracker=tracker, run_id=run_id, ckpt_dir=ckpt_dir, runtime=runtime, data=data,
                model=model, global_model=global_model, net=net, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, loss_fn=_loss_fn(config), manager=CheckpointManager(ckpt_dir), n_steps=n_steps, pin=pin)


def _restore(run: _Run, resume_state: dict | None) -> None:
    """Load the checkpoint into the run (or log the new run's params), then tag the run and log what MLflow missed."""
    config, tracker, model, data = run.config, run.tracker, run.model, run.data
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        run.optimizer.load_state_dict(resume_state["optimizer"])
        run.scheduler.load_state_dict(resume_state["scheduler"])
        run.scaler.load_state_dict(resume_state["scaler"])
        restore_rng_state(resume_state["rng"])
        run.history = list(resume_state["history"])
        run.best = dict(resume_state["best"])
        run.start_epoch, run.start_step = resume_state["epoch"], resume_state["step"]
        run.partial = dict(resume_state.get("partial") or run.partial)
    else:
        log_config(tracker, config)
    tracker.set_tags({"deepsports.device": run.runtime.device_name,
                      "deepsports.checkpoint_dir": str(run.ckpt_dir.resolve()),
                      "deepsports.trainable_params": str(trainable), "deepsports.total_params": str(total_params),
                      **{f"deepsports.dataset.{k}": str(v) for k, v in data.fingerprint.items()}})
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


def _train_epoch(run: _Run, epoch: int, hooks: TrainHooks) -> tuple[dict, float, float]:
    """The optimisation steps of one epoch (from the checkpoint's step when resuming mid-epoch).

    Returns the epoch's running sums, its start time and its training seconds. Raises
    :class:`PreemptedError` after writing a mid-epoch checkpoint when a stop was requested.
    """
    config, env, runtime, data, model, optimizer = run.config, run.env, run.runtime, run.data, run.model, run.optimizer
    first_step = run.start_step if epoch == run.start_epoch else 0
    acc = run.partial if epoch == run.start_epoch and first_step else {"loss_sum": 0.0, "clips": 0, "seconds": 0.0}
    acc.setdefault("data_wait_s", 0.0)  # a partial checkpoint from before this figure existed has none
    data.train.set_epoch(epoch)
    order = EpochSampler(len(data.train), config.seed, epoch, start=first_step * config.batch_size)
    batches = ShardedBatchSampler(list(order), config.batch_size, env, train=True)
    loader = make_loader(data.train, config.batch_size, config.num_workers, batch_sampler=batches,
                         pin_memory=run.pin)
    run.net.train()
    progress = _Progress(run.n_steps, f"epoch {epoch}/{config.epochs}", config.log_every_steps)
    tick = time.perf_counter()
    step = first_step
    asked = time.perf_counter()  # when the loop asked the loader for the next batch
    try:
        for batch, sizes in zip(loader, batches.global_sizes):
            # Time the training waited for data (worker start-up included): ~0 when the loader keeps up.
            acc["data_wait_s"] += time.perf_counter() - asked
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
            acc["loss_sum"] += float(loss.detach()) * len(target)
            acc["clips"] += len(target)
            if env.is_main:
                progress.update(float(loss.detach()), first_step)
            if _stop(env, hooks.stop_requested, runtime.device) and step < run.n_steps:
                acc_now = {**acc, "seconds": acc["seconds"] + time.perf_counter() - tick}
                path = run.manager.save_partial(epoch, run.state(epoch, step, acc_now)) if env.is_main else run.ckpt_dir
                raise PreemptedError(f"stop requested at epoch {epoch} step {step}/{run.n_steps}; checkpoint {path}")
            asked = time.perf_counter()
    except torch.OutOfMemoryError as exc:
        raise TrainingError(f"out of memory at epoch {epoch} step {step + 1} (batch_size={config.batch_size}, "
                            f"frame_num={config.frame_num}, spatial_size={config.spatial_size}): {exc}") from exc
    finally:
        progress.close()
    return acc, tick, acc["seconds"] + time.perf_counter() - tick


def _report_epoch(run: _Run, epoch: int, acc: dict, tick: float, train_seconds: float, hooks: TrainHooks) -> None:
    """Validate, checkpoint, then log the epoch (in that order: nothing logged that is not on disk)."""
    config, env, runtime = run.config, run.env, run.runtime
    val = predict(run.global_model, eval_loader(run.data.val, config.batch_size, config.num_workers, env, run.pin),
                  runtime, run.loss_fn, env)
    val_metrics = val.metrics()
    epoch_seconds = time.perf_counter() - tick + acc["seconds"]
    row = {"epoch": epoch, "train_loss": acc["loss_sum"] / max(1, acc["clips"]), "val_loss": val_metrics["loss"],
           "val_spearman": val_metrics["spearman"], "val_rel_l2": val_metrics["rel_l2"], "val_mse": val_metrics["mse"],
           "val_difficulty_mae": val_metrics["difficulty_mae"], "learning_rate": run.optimizer.param_groups[0]["lr"],
           "epoch_seconds": epoch_seconds, "clips_per_s": acc["clips"] / max(train_seconds, 1e-9),
           "data_wait_fraction": min(1.0, acc["data_wait_s"] / max(train_seconds, 1e-9))}
    run.history.append(row)
    is_best = row["val_spearman"] > run.best["val_spearman"]
    if is_best:
        run.best = {"val_spearman": row["val_spearman"], "epoch": epoch}
    hooks.fault("checkpoint", epoch)
    if env.is_main:
        run.manager.save(epoch, run.state(epoch + 1, 0, None), is_best=is_best)
    hooks.fault("log", epoch)
    run.epoch_log.log(row, epoch)  # once per step, also when resumed from an older checkpoint
    log.info("epoch %d/%d: train_loss %.4f val_loss %.4f val_spearman %.4f (%.1f clips/s, %.1f s, %.0f%% of it "
             "waiting for data)", epoch, config.epochs, row["train_loss"], row["val_loss"], row["val_spearman"],
             row["clips_per_s"], epoch_seconds, 100 * row["data_wait_fraction"])
    if _stop(env, hooks.stop_requested, runtime.device) and epoch < config.epochs:
        raise PreemptedError(f"stop requested after epoch {epoch}; checkpoint in {run.ckpt_dir}")
    if hooks.epoch_callback is not None:
        hooks.epoch_callback(EpochReport(epoch=epoch, metrics={k: row[k] for k in EPOCH_METRICS}, run_id=run.run_id))


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


def _check_same_config(path: Path, saved_values: dict, config: Config) -> None:
    saved = build_config(saved_values).to_dict()
    diff = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v and k not in RESUME_MAY_CHANGE)
    if diff:
        raise CheckpointError(f"{path}: the checkpoint was written with a different config "
                              f"({', '.join(diff)} differ); use another checkpoint_dir or resume=never")


def load_training_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (weights only)."""
    return load_checkpoint(path)
