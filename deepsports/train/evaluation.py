"""Data loading order and prediction loops shared by training and evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepsports.errors import TrainingError
from deepsports.signals import ignore_stop_signals, stop_signals_blocked
from deepsports.train.distributed import SINGLE, DistEnv, GlobalBatchModel, ShardedBatchSampler, gather_rows
from deepsports.train.losses import SCORE_SCALE
from deepsports.train.metrics import regression_metrics
from deepsports.train.runtime import Runtime


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
        if not self.num_workers:
            return super().__iter__()
        with stop_signals_blocked():  # the workers start here (see ignore_stop_signals)
            iterator = super().__iter__()
        return _checked(iterator)


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


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s training loader (its workers' seeds): a function of (seed, epoch) only."""
    return (seed * 100_003 + epoch) * 2 + 1  # odd: never EpochSampler's seed for the same (seed, epoch)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler: Sampler | None = None,
                drop_last: bool = False, pin_memory: bool = False,
                batch_sampler: Sampler[list[int]] | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader over ``dataset``; with ``batch_sampler`` (e.g. :class:`ShardedBatchSampler`) the
    batches are its index lists and ``batch_size``/``sampler``/``drop_last`` are not used.

    The loader draws its workers' base seed from its own generator seeded with ``seed``, not from
    torch's global RNG: creating a loader then leaves the global stream (dropout, drop-path) untouched,
    so a run resumed mid-epoch continues that stream exactly where the checkpoint left it.
    """
    prefetch = 4 if num_workers else None
    # Workers ignore the job's stop signals (SLURM sends them to every process): the main process
    # stops at the next step boundary, checkpoints and shuts the workers down.
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, prefetch_factor=prefetch,
                  worker_init_fn=ignore_stop_signals if num_workers else None,
                  generator=torch.Generator().manual_seed(seed))
    if batch_sampler is not None:
        return _WorkerCheckedLoader(dataset, batch_sampler=batch_sampler, **common)
    return _WorkerCheckedLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                                **common)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, env: DistEnv = SINGLE,
                pin_memory: bool = False) -> DataLoader:
    """Batches of ``dataset`` in order; under DDP each rank loads its shard of every batch."""
    sampler = ShardedBatchSampler(range(len(dataset)), batch_size, env, train=False)
    return make_loader(dataset, batch_size, num_workers, batch_sampler=sampler, pin_memory=pin_memory)


@dataclass
class Predictions:
    video: np.ndarray
    clip: np.ndarray
    true_score: np.ndarray
    pred_score: np.ndarray
    true_difficulty: np.ndarray
    pred_difficulty: np.ndarray
    loss: float
    #: Predicted execution (final / difficulty, ``out0 * 30``): times the true difficulty it is the
    #: literature's "w/ DD" score (:mod:`deepsports.train.quality`).
    pred_execution: np.ndarray | None = None

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
def predict(model: torch.nn.Module, loader: DataLoader, runtime: Runtime, loss_fn, env: DistEnv = SINGLE) -> Predictions:
    """Run ``model`` over ``loader`` in eval mode; final score = out0 * out1 * 30.

    The loss is computed per batch (its Spearman term spans the batch) and averaged over clips. Under
    DDP ``loader`` holds this rank's shards (:func:`eval_loader`) and every rank returns the
    predictions of the whole split, the same as one process would.
    """
    gmodel = model if isinstance(model, GlobalBatchModel) else GlobalBatchModel(model, env)
    batch_sampler = getattr(loader, "batch_sampler", None)
    all_sizes = batch_sampler.global_sizes if isinstance(batch_sampler, ShardedBatchSampler) else None
    was_training = gmodel.training
    gmodel.eval()
    cols: dict[str, list] = {k: [] for k in ("meta", "ps", "pd", "pe")}
    loss_sum, count = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            video = runtime.video_input(batch["video"])
            sizes = all_sizes[i] if all_sizes is not None else [len(video)]
            with runtime.autocast():
                out = gmodel(video, sizes)
            out = out.float()
            target = gather_rows(batch["target"].to(runtime.device, non_blocking=True), sizes, env)
            meta = torch.stack([batch[k].double() for k in ("video_id", "clip_id", "final_score", "difficulty")], 1)
            # Labels and ids stay on the host unless other ranks need them (the collective runs on the device).
            meta = gather_rows(meta.to(runtime.device), sizes, env) if env.enabled else meta
            loss, _ = loss_fn(out, target)
            loss_sum += float(loss) * len(out)
            count += len(out)
            cols["meta"].append(meta.cpu().numpy())
            cols["ps"].append((out[:, 0] * out[:, 1] * SCORE_SCALE).double().cpu().numpy())
            cols["pd"].append(out[:, 1].double().cpu().numpy())
            cols["pe"].append((out[:, 0] * SCORE_SCALE).double().cpu().numpy())
    finally:
        gmodel.train(was_training)
    meta_all = np.concatenate(cols["meta"]) if cols["meta"] else np.zeros((0, 4))
    return Predictions(video=meta_all[:, 0].astype(np.int64), clip=meta_all[:, 1].astype(np.int64),
                       true_score=meta_all[:, 2], pred_score=np.concatenate(cols["ps"]) if cols["ps"] else np.zeros(0),
                       true_difficulty=meta_all[:, 3],
                       pred_difficulty=np.concatenate(cols["pd"]) if cols["pd"] else np.zeros(0),
                       loss=loss_sum / count if count else math.nan,
                       pred_execution=np.concatenate(cols["pe"]) if cols["pe"] else np.zeros(0))
