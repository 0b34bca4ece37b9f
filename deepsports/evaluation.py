"""Data loading order and prediction loops shared by training and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepsports.errors import TrainingError
from deepsports.losses import SCORE_SCALE
from deepsports.metrics import regression_metrics
from deepsports.runtime import Runtime


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), and can start part-way through.

    Resuming a preempted epoch must see exactly the batches the interrupted run had not seen yet,
    so the permutation is recomputed from the seed instead of taken from a stateful generator.
    """

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True):
        self.size, self.seed, self.epoch, self.start, self.shuffle = size, seed, epoch, start, shuffle

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.size - self.start)


class _WorkerCheckedLoader(DataLoader):
    """A DataLoader whose worker failures surface as one :class:`TrainingError` (see :func:`_checked`)."""

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        return _checked(iterator) if self.num_workers else iterator


#: How torch words an exception re-raised from a worker, and a worker that died (segfault, OOM killer).
_WORKER_MARKERS = ("in DataLoader worker process", "DataLoader worker (pid")


def _checked(iterator: Iterator[Any]) -> Iterator[Any]:
    """Yield from ``iterator``; an error from a worker process becomes a :class:`TrainingError` with the
    worker's own last line (torch re-raises it with the worker's whole traceback as its message, and
    as the worker's exception type, e.g. a DataError that would stop a whole study instead of a trial)."""
    batches = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        # The type is whatever the worker raised; only errors worded as coming from a worker are
        # converted, everything else propagates unchanged.
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if not any(marker in text for marker in _WORKER_MARKERS):
                raise
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            raise TrainingError(f"a DataLoader worker failed loading batch {batches + 1}: {lines[-1]}") from exc
        batches += 1
        yield batch


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler: Sampler | None = None,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    return _WorkerCheckedLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
                                prefetch_factor=4 if num_workers else None)


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    # The last, smaller batch is kept unless it would hold a single clip (a batch Spearman needs two).
    full, rest = divmod(dataset_size, batch_size)
    return full + (1 if rest > 1 else 0)


@dataclass
class Predictions:
    video: np.ndarray
    clip: np.ndarray
    true_score: np.ndarray
    pred_score: np.ndarray
    true_difficulty: np.ndarray
    pred_difficulty: np.ndarray
    loss: float

    def rows(self) -> list[dict[str, Any]]:
        return [dict(video=int(v), clip=int(c), true_score=float(ts), pred_score=float(ps), true_difficulty=float(td),
                     pred_difficulty=float(pd))
                for v, c, ts, ps, td, pd in zip(self.video, self.clip, self.true_score, self.pred_score,
                                                 self.true_difficulty, self.pred_difficulty)]

    def metrics(self) -> dict[str, float]:
        out = regression_metrics(self.pred_score, self.true_score, self.pred_difficulty, self.true_difficulty)
        out["loss"] = self.loss
        return out


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, runtime: Runtime, loss_fn) -> Predictions:
    """Run ``model`` over ``loader`` in eval mode; final score = out0 * out1 * 30."""
    was_training = model.training
    model.eval()
    cols: dict[str, list] = {k: [] for k in ("video", "clip", "ts", "ps", "td", "pd")}
    loss_sum, count = 0.0, 0
    try:
        for batch in loader:
            video = batch["video"].to(runtime.device, non_blocking=True)
            target = batch["target"].to(runtime.device, non_blocking=True)
            with runtime.autocast():
                out = model(video)
            out = out.float()
            loss, _ = loss_fn(out, target)
            loss_sum += float(loss) * len(video)
            count += len(video)
            cols["video"].append(batch["video_id"].numpy())
            cols["clip"].append(batch["clip_id"].numpy())
            cols["ts"].append(batch["final_score"].double().numpy())
            cols["td"].append(batch["difficulty"].double().numpy())
            cols["ps"].append((out[:, 0] * out[:, 1] * SCORE_SCALE).double().cpu().numpy())
            cols["pd"].append(out[:, 1].double().cpu().numpy())
    finally:
        model.train(was_training)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return Predictions(video=cat["video"], clip=cat["clip"], true_score=cat["ts"], pred_score=cat["ps"],
                       true_difficulty=cat["td"], pred_difficulty=cat["pd"],
                       loss=loss_sum / count if count else math.nan)
