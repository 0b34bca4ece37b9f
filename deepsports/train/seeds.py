"""``--seeds N``: N seeds of one configuration as sibling MLflow runs under one parent.

Seed ``config.seed + i`` drives the model's initialisation, the train/validation split, the sampling
and the augmentation (the test split is fixed), so the spread across seeds is what a reader of one
number should expect from running the same configuration again. Every seed selects its best epoch on
validation and evaluates the test split once (the end of ``train``). The parent logs, for every test
metric ``m`` (and ``best_val_spearman``): ``m_mean``, ``m_std`` (sample sd, n - 1) and the 95 %
Student-t interval of the mean ``m_seeds_ci_low`` / ``m_seeds_ci_high`` (clipped to the metric's range:
a Spearman to [-1, 1], an error to >= 0), plus ``seeds.csv``. Two seeds give a wide interval (t = 12.7).

With ``checkpoint_dir`` each seed checkpoints into ``<checkpoint_dir>/seed-<s>`` and
``<checkpoint_dir>/seeds.json`` records the parent run and the finished seeds: the same command run
again (after a preemption) resumes the parent, skips the finished seeds and resumes the interrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepsports.config import Config
from deepsports.errors import ConfigError
from deepsports.fileio import atomic_write
from deepsports.tags import SEED_PARENT_RUN_TAG, SEEDS_TAG

log = logging.getLogger(__name__)

#: Confidence of the interval of the mean across seeds.
SEEDS_CONFIDENCE = 0.95
_RECORD = "seeds.json"


@dataclass
class SeedsResult:
    run_id: str  #: the parent run
    seeds: list[int]
    run_ids: list[str]
    #: ``<metric>_mean`` / ``_std`` / ``_seeds_ci_low`` / ``_seeds_ci_high`` of the seeds' test metrics.
    test_metrics: dict[str, float]
    per_seed: list[dict[str, Any]] = field(default_factory=list)


def metric_range(key: str) -> tuple[float, float]:
    """The values metric ``key`` can take: a Spearman correlation lies in [-1, 1]; an error (MSE, R-l2, MAE) is
    never negative; anything else (a loss with a subtracted Spearman term) is unbounded."""
    name = key.removesuffix("_dd")
    if name.endswith("spearman"):
        return -1.0, 1.0
    if name.endswith(("_mse", "_rel_l2", "_mae")):
        return 0.0, math.inf
    return -math.inf, math.inf


def aggregate(values: list[float], confidence: float = SEEDS_CONFIDENCE,
              bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, float]:
    """Mean, sample standard deviation and Student-t interval of the mean of ``values`` (NaN where undefined),
    the interval clipped to ``bounds`` (the metric's range: with few seeds the t interval is wide, and a
    Spearman bound of 1.28 or a negative MSE bound says nothing)."""
    from scipy import stats

    array = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(array))
    if array.size < 2 or not np.all(np.isfinite(array)):
        return {"mean": mean, "std": math.nan, "seeds_ci_low": math.nan, "seeds_ci_high": math.nan}
    sd = float(np.std(array, ddof=1))
    low, high = stats.t.interval(confidence, array.size - 1, loc=mean, scale=sd / math.sqrt(array.size)) \
        if sd > 0 else (mean, mean)
    low, high = max(float(low), bounds[0]), min(float(high), bounds[1])
    return {"mean": mean, "std": sd, "seeds_ci_low": low, "seeds_ci_high": high}


def _aggregated_metrics(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregates of every metric all seeds have; a bootstrap bound is per run and is not averaged."""
    keys = set.intersection(*(set(row["metrics"]) for row in per_seed))
    out: dict[str, float] = {}
    for key in sorted(k for k in keys if not k.endswith(("_ci_low", "_ci_high"))):
        for stat, value in aggregate([row["metrics"][key] for row in per_seed], bounds=metric_range(key)).items():
            out[f"{key}_{stat}"] = value
    return out


def _load_record(ckpt_dir: Path | None, n_seeds: int, config: Config) -> dict[str, Any]:
    path = ckpt_dir / _RECORD if ckpt_dir else None
    if path is None or not path.is_file():
        return {"parent_run_id": None, "done": {}}
    record = json.loads(path.read_text())
    if record.get("n_seeds") != n_seeds or record.get("first_seed") != config.seed:
        raise ConfigError(f"{path}: recorded --seeds {record.get('n_seeds')} from seed {record.get('first_seed')}, "
                          f"not --seeds {n_seeds} from seed {config.seed}; use another checkpoint_dir")
    return record


def _save_record(ckpt_dir: Path | None, record: dict[str, Any]) -> None:
    if ckpt_dir is None:
        return
    # atomic: a kill leaves the old record or the new one
    atomic_write(ckpt_dir / _RECORD, lambda f: f.write(json.dumps(record, indent=2).encode()), what="seeds record")


def train_seeds(config: Config, n_seeds: int, *, parent_run_id: str | None = None,
                tags: dict[str, str] | None = None, train_fn: Callable[..., Any] | None = None,
                **train_kwargs: Any) -> SeedsResult:
    """Train seeds ``config.seed .. config.seed + n_seeds - 1`` under one parent run (itself a child of
    ``parent_run_id`` when given) and log their aggregates on it. ``train_kwargs`` go to every ``train``."""
    if n_seeds < 2:
        raise ConfigError(f"--seeds {n_seeds}: expected 2 or more (one seed is a plain run)")
    if not config.evaluate:
        raise ConfigError("--seeds aggregates test metrics: it needs evaluate=true")
    if n_seeds == 2:
        log.warning("--seeds 2: the 95 %% interval of the mean of 2 seeds is mean +- 12.7 x sd / sqrt(2) (Student-t "
                    "with 1 degree of freedom): expect it to span most of a metric's range; 3 seeds give +- 4.3 x "
                    "sd / sqrt(3), 5 seeds +- 2.8 x sd / sqrt(5)")
    from deepsports.slurm.env import run_tags
    from deepsports.tracking.runs import RunTracker
    from deepsports.train import distributed
    from deepsports.train.reporting import log_config

    if distributed.detect().enabled:
        raise ConfigError("--seeds runs its seeds one after another in one process: not under torchrun or srun")
    if train_fn is None:
        from deepsports.train.loop import train as train_fn
    ckpt_dir = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
    record = _load_record(ckpt_dir, n_seeds, config)
    seeds = [config.seed + i for i in range(n_seeds)]
    base_name = config.run_name or "train"
    tracker = RunTracker()
    parent = tracker.start(experiment_name=config.experiment_name, run_name=f"{base_name}-{n_seeds}seeds",
                           parent_run_id=parent_run_id, run_id=record["parent_run_id"],
                           tags={**(tags or {}), SEEDS_TAG: ",".join(map(str, seeds))}, cluster=run_tags())
    record.update(parent_run_id=parent, n_seeds=n_seeds, first_seed=config.seed)
    _save_record(ckpt_dir, record)
    with tracker:
        log_config(tracker, config, leave_out=("seed",))
        tracker.log_params({"seeds": ",".join(map(str, seeds))})
        for seed in seeds:
            if str(seed) in record["done"]:
                continue
            seed_config = config.replace(seed=seed, run_name=f"{base_name}-seed{seed}",
                                         checkpoint_dir=str(ckpt_dir / f"seed-{seed}") if ckpt_dir else "")
            result = train_fn(seed_config, parent_run_id=parent,
                              tags={**(tags or {}), SEED_PARENT_RUN_TAG: parent}, **train_kwargs)
            record["done"][str(seed)] = {"seed": seed, "run_id": result.run_id,
                                         "best_val_spearman": result.best_val_spearman,
                                         "metrics": {**{f"test_{k}": v for k, v in result.test_metrics.items()},
                                                     "best_val_spearman": result.best_val_spearman}}
            _save_record(ckpt_dir, record)
        per_seed = [record["done"][str(seed)] for seed in seeds]
        metrics = _aggregated_metrics(per_seed)
        if not record.get("aggregated"):  # a rerun of a finished command logs nothing twice
            tracker.log_metrics(metrics, step=0)
            _log_seed_table(tracker, per_seed)
            record["aggregated"] = True
            _save_record(ckpt_dir, record)
    return SeedsResult(run_id=parent, seeds=seeds, run_ids=[row["run_id"] for row in per_seed],
                       test_metrics=metrics, per_seed=per_seed)


def _log_seed_table(tracker, per_seed: list[dict[str, Any]]) -> None:
    keys = sorted(set.intersection(*(set(row["metrics"]) for row in per_seed)))
    with tempfile.TemporaryDirectory(prefix="deepsports-seeds-") as tmp:
        path = Path(tmp) / "seeds.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seed", "run_id", *keys])
            for row in per_seed:
                writer.writerow([row["seed"], row["run_id"], *(row["metrics"][k] for k in keys)])
        tracker.log_artifact(path)
