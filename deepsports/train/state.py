"""The training loop's state, typed: one run's parts and its progress, and what a checkpoint holds of it.

:class:`Run` is built once per ``train`` call (:func:`deepsports.train.loop._build_run`) and updated
epoch by epoch. Its progress (:class:`EpochTally`, :class:`BestResult`, the history, where the run
resumes) travels in every checkpoint as plain values (the checkpoint format is weights-only:
tensors, str/int/float/bool/None and lists/dicts of them), written by :meth:`Run.state` and read back
by the ``from_state`` constructors below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsports.config import Config
from deepsports.data import DataBundle
from deepsports.tracking.runs import NullTracker, RunTracker
from deepsports.train.checkpoints import CheckpointManager
from deepsports.train.distributed import DistEnv, GlobalBatchModel
from deepsports.train.metric_log import EpochMetricLog, LogOnce
from deepsports.train.runtime import Runtime

#: Version of what a checkpoint holds for an exact resume (2: one RNG state per rank, loaders seeded
#: from (seed, epoch) instead of drawing from the global RNG). An older checkpoint resumes, tagged inexact.
RESUME_FORMAT = 2

#: ``(outputs, targets) -> (loss, its parts)``: :func:`deepsports.train.losses.aqa_loss` with the config's weights.
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]


@dataclass
class EpochReport:
    """What the epoch callback sees after each epoch (``metrics`` holds :data:`EPOCH_METRICS`)."""

    epoch: int
    metrics: dict[str, float]
    run_id: str


@dataclass(frozen=True)
class TrainHooks:
    """What a caller plugs into the loop (each optional).

    ``epoch_callback`` runs after each epoch's checkpoint and metrics; an exception it raises stops
    the run, whose MLflow status is the exception's ``mlflow_status`` attribute (default FAILED).
    ``stop_requested`` is polled after every step and after every epoch: when it returns true a
    checkpoint is written, the run is marked interrupted (KILLED) and :class:`PreemptedError` is
    raised. ``fault_hook(where, step)`` is called at named points of the loop (``"step"`` before each
    step's forward pass, ``"checkpoint"`` before an epoch's checkpoint, ``"log"`` after it, before its
    metrics are logged); tests use it to inject faults.
    """

    epoch_callback: Callable[[EpochReport], None] | None = None
    stop_requested: Callable[[], bool] | None = None
    fault_hook: Callable[[str, int], None] | None = None

    def fault(self, where: str, step: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(where, step)


@dataclass
class EpochTally:
    """The running sums of one epoch's training steps (a mid-epoch checkpoint holds them)."""

    loss_sum: float = 0.0  #: sum of ``loss * clips`` over the steps, added in step order
    clips: int = 0
    seconds: float = 0.0  #: training seconds of earlier attempts at this epoch (before a stop)
    data_wait_s: float = 0.0  #: seconds the steps waited for the loader

    def to_state(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum, "clips": self.clips, "seconds": self.seconds,
                "data_wait_s": self.data_wait_s}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochTally:
        state = state or {}
        # A partial checkpoint from before data_wait_s existed has none.
        return cls(loss_sum=float(state.get("loss_sum", 0.0)), clips=int(state.get("clips", 0)),
                   seconds=float(state.get("seconds", 0.0)), data_wait_s=float(state.get("data_wait_s", 0.0)))

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(1, self.clips)


@dataclass
class PartialEpoch:
    """Where training (re)starts: ``epoch`` from ``step`` (0: its beginning) with the steps' ``tally`` so far."""

    epoch: int = 1
    step: int = 0
    tally: EpochTally = field(default_factory=EpochTally)


@dataclass
class BestResult:
    """The best validation Spearman so far and its epoch (0: none yet)."""

    val_spearman: float = -math.inf
    epoch: int = 0

    def to_state(self) -> dict[str, float | int]:
        return {"val_spearman": self.val_spearman, "epoch": self.epoch}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BestResult:
        return cls(val_spearman=float(state["val_spearman"]), epoch=int(state["epoch"]))


@dataclass
class TrainedEpoch:
    """What one epoch's optimisation steps hand to its report: the tally and the clock."""

    epoch: int
    tally: EpochTally
    started: float  #: ``time.perf_counter()`` when this attempt at the epoch began
    train_seconds: float  #: training seconds, earlier attempts included


@dataclass
class Run:
    """One run's parts (built once) and its progress (updated epoch by epoch)."""

    config: Config
    env: DistEnv
    tracker: RunTracker | NullTracker | LogOnce
    run_id: str
    ckpt_dir: Path
    runtime: Runtime
    data: DataBundle
    model: torch.nn.Module  #: the plain model: checkpoints and evaluation use it
    global_model: GlobalBatchModel
    net: torch.nn.Module  #: what the training step calls (DDP and/or torch.compile around ``global_model``)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: LossFn
    manager: CheckpointManager
    n_steps: int
    pin: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best: BestResult = field(default_factory=BestResult)
    start: PartialEpoch = field(default_factory=PartialEpoch)
    epoch_log: EpochMetricLog | None = None  #: set by _restore: what MLflow already holds

    hooks: TrainHooks = field(default_factory=TrainHooks)
    #: Why a resume of this run was not exact (all its resumes so far; empty: every one was exact).
    inexact: list[str] = field(default_factory=list)

    def state(self, epoch: int, step: int, tally: EpochTally | None, rng_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint's contents: training resumes at ``epoch`` from ``step`` with ``tally`` (None: a fresh
        epoch). ``rng_ranks``: every rank's :func:`~deepsports.train.checkpoints.capture_rng_state`, in rank order."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_ranks[0], "rng_ranks": rng_ranks, "world_size": self.env.world_size,
                "device_type": self.runtime.device.type, "resume_format": RESUME_FORMAT,
                "inexact_resume": list(self.inexact), "config": self.config.to_dict(), "mlflow_run_id": self.run_id,
                "epoch": epoch, "step": step, "partial": None if tally is None else tally.to_state(),
                "history": self.history, "best": self.best.to_state()}
