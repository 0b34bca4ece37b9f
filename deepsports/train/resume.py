"""Resuming a run: which checkpoint (or run record) to continue, whether its config may be continued, and
loading its states into the run, with the reasons a continuation is not exactly the stopped run."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from deepsports.config import Config, build_config
from deepsports.errors import CheckpointError
from deepsports.train.checkpoints import CheckpointManager, restore_rng_state
from deepsports.train.distributed import DistEnv
from deepsports.train.state import RESUME_FORMAT, BestResult, EpochTally, PartialEpoch, Run

log = logging.getLogger(__name__)

#: Keys that may differ between a checkpoint and the config resuming it (they do not change the maths
#: of the epochs already done): more epochs, other workers, logging and the final evaluation.
RESUME_MAY_CHANGE = frozenset({"epochs", "num_workers", "compile", "loglevel", "log_every_steps", "gpu", "evaluate",
                               "log_model", "log_checkpoint", "run_name", "resume", "checkpoint_dir", "cache_dir",
                               "dist_backend", "system_metrics_interval_s"})


#: Of :data:`RESUME_MAY_CHANGE`, the keys that change the maths of the epochs still to run: a resume
#: with another value continues correctly but is not the run that was stopped.
_CHANGES_THE_MATHS = frozenset({"epochs", "compile", "gpu"})


def find_resume(config: Config, env: DistEnv, ckpt_dir: Path | None) -> tuple[Path | None, dict | None, str | None]:
    """Rank 0: the checkpoint to resume from, its state and the MLflow run to continue (each may be None)."""
    resume_path, resume_state, resume_run_id = None, None, None
    if env.is_main and ckpt_dir is not None and config.resume == "auto":
        manager = CheckpointManager(ckpt_dir)
        found = manager.latest_valid()
        if found is not None:
            resume_path, resume_state = found
            log.info("resuming from %s", resume_path)
            check_same_config(resume_path, resume_state["config"], config)
            resume_run_id = resume_state.get("mlflow_run_id")
        elif (record := manager.recorded_run()) is not None:
            # Killed before the first checkpoint: continue its MLflow run from epoch 1, not a second run.
            check_same_config(manager.run_record_path, record.get("config") or {}, config)
            resume_run_id = record["mlflow_run_id"]
            log.info("restarting MLflow run %s from epoch 1 (no checkpoint yet)", resume_run_id)
    return resume_path, resume_state, resume_run_id


def check_same_config(path: Path, saved_values: dict, config: Config) -> None:
    """Refuse a checkpoint written with another config, but for the keys of :data:`RESUME_MAY_CHANGE`."""
    saved = build_config(saved_values).to_dict()
    diff = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v and k not in RESUME_MAY_CHANGE)
    if diff:
        raise CheckpointError(f"{path}: the checkpoint was written with a different config "
                              f"({', '.join(diff)} differ); use another checkpoint_dir or resume=never")


def restore_state(run: Run, state: dict) -> list[str]:
    """Load a checkpoint's states into ``run``; returns why the continuation is not the stopped run's (empty: exact).

    The reasons accumulate over the resumes of one run (the checkpoint carries the earlier ones).
    """
    env = run.env
    reasons = [str(r) for r in state.get("inexact_resume") or []]
    if int(state.get("resume_format", 1)) < RESUME_FORMAT:
        reasons.append("the checkpoint was written by a version before exact resume (its loaders drew from the "
                       "global RNG)")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    per_rank = state.get("rng_ranks")
    rng = state.get("rng")
    if per_rank is not None and len(per_rank) == env.world_size:
        rng = per_rank[env.rank]
    elif per_rank is not None:
        reasons.append(f"the checkpoint was written by {len(per_rank)} process(es), resumed by {env.world_size}")
    elif env.enabled and rng is not None:
        reasons.append("the checkpoint holds one RNG state, not one per rank")
    if rng is None:
        reasons.append("the checkpoint holds no RNG state")
    else:
        saved_cuda = len(rng.get("cuda") or [])
        if saved_cuda and saved_cuda != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
            reasons.append(f"the checkpoint's {saved_cuda} CUDA RNG state(s) do not fit this process's devices")
        restore_rng_state(rng)
    run.history = list(state["history"])
    run.best = BestResult.from_state(state["best"])
    run.start = PartialEpoch(epoch=int(state["epoch"]), step=int(state["step"]),
                             tally=EpochTally.from_state(state.get("partial")))
    if run.start.step and state.get("partial") is None:
        reasons.append("the mid-epoch checkpoint holds no epoch tally")
    saved = build_config(state["config"]).to_dict()
    changed = sorted(k for k, v in run.config.to_dict().items() if k in _CHANGES_THE_MATHS and saved.get(k) != v)
    if changed:
        reasons.append("config changed: " + ", ".join(f"{k} {saved.get(k)!r} -> {run.config.to_dict()[k]!r}"
                                                      for k in changed))
    if state.get("device_type", run.runtime.device.type) != run.runtime.device.type:
        reasons.append(f"written on {state['device_type']}, resumed on {run.runtime.device.type}")
    return list(dict.fromkeys(reasons))  # each reason once, oldest first
