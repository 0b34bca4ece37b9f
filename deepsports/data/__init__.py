"""Data: annotations, the PyAV clip cache, frame sampling and the training datasets.

:func:`build_datasets` is the one call training makes: it finds the dataset (generating the synthetic
one on first use), applies the ``videos`` filter, prepares the clip cache, splits the train split into
train/val with ``config.seed`` and returns the three :class:`ClipDataset` objects with the split and a
fingerprint to record. Torch is imported only when a dataset is built, so ``prepare`` workers stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deepsports.data.cache import CachedClip, CacheIndex, clip_cache_dir
from deepsports.data.prepare import (
    DataSource,
    Selection,
    prepare_cache,
    prepare_from_config,
    resolve_source,
    select_clips,
)
from deepsports.data.sampling import sample_indices
from deepsports.data.video import FIRST_FRAME_NUMBER, ClipRange, decode_clips
from deepsports.errors import DataError

if TYPE_CHECKING:
    from deepsports.config import Config
    from deepsports.data.dataset import ClipDataset

__all__ = ["DataBundle", "build_datasets", "split_train_val", "prepare_cache", "prepare_from_config", "resolve_source",
           "select_clips", "DataSource", "Selection", "CacheIndex", "CachedClip", "clip_cache_dir", "sample_indices",
           "decode_clips", "ClipRange", "FIRST_FRAME_NUMBER", "ClipDataset", "NORMALIZE_MEAN", "NORMALIZE_STD"]

log = logging.getLogger(__name__)

_LAZY = {"ClipDataset", "NORMALIZE_MEAN", "NORMALIZE_STD", "clip_target", "intermediate_size"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from deepsports.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DataBundle:
    """The three datasets of a run plus what to record about them.

    ``split``: ``{"train": [[video, clip], ...], "val": [...], "test": [...]}`` (the seeded train/val
    split of the train split). ``fingerprint``: flat str/int values identifying the data (annotation
    hash, clip counts, split hash, frame size).
    """

    train: ClipDataset
    val: ClipDataset
    test: ClipDataset
    fingerprint: dict[str, Any]
    split: dict[str, list[list[int]]]
    cache: CacheIndex
    source: DataSource


def split_train_val(keys: list[tuple[int, int]], ratio: float, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Seeded split: ``int(len * ratio)`` clips train (as the original's ``random_split`` sizes), the rest validate.

    Keys are sorted first, so the split does not depend on the order of the split file.
    """
    ordered = sorted(keys)
    num_train = int(len(ordered) * ratio)
    if num_train < 1 or num_train >= len(ordered):
        raise DataError(f"train_val_split_ratio={ratio} splits {len(ordered)} train clips into {num_train} train and "
                        f"{len(ordered) - num_train} validation clips; both need at least one")
    order = np.random.default_rng(seed).permutation(len(ordered))
    return sorted(ordered[i] for i in order[:num_train]), sorted(ordered[i] for i in order[num_train:])


def _hash_split(split: dict[str, list[list[int]]]) -> str:
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:16]


def build_datasets(config: Config, progress: bool = True) -> DataBundle:
    """Datasets of ``config``: train (augmented, per-epoch randomness), val and test (reproducible).

    Raises :class:`DataError` for missing/bad files, an unknown video in ``videos``, or a split that
    leaves train or validation empty.
    """
    from deepsports.data.annotations import annotation_fingerprint
    from deepsports.data.dataset import ClipDataset

    selection = select_clips(config, progress)
    cache = prepare_cache(selection.source.root, selection.annotations, selection.train_keys + selection.test_keys,
                          config.cache_path, config.frame_size, skip_bad=False, progress=progress)
    train_keys, val_keys = split_train_val(selection.train_keys, config.train_val_split_ratio, config.seed)
    test_keys = sorted(selection.test_keys)
    split = {"train": [list(k) for k in train_keys], "val": [list(k) for k in val_keys],
             "test": [list(k) for k in test_keys]}

    def dataset(keys: list[tuple[int, int]], train: bool) -> ClipDataset:
        return ClipDataset.from_config(config, [selection.annotations[k] for k in keys], cache, train=train)

    videos = sorted({key[0] for key in train_keys + val_keys + test_keys})
    fingerprint = {
        "dataset": selection.source.dataset,
        "root": str(selection.source.root),
        "annotations_sha256": annotation_fingerprint(selection.source.annotation_path),
        "num_train": len(train_keys), "num_val": len(val_keys), "num_test": len(test_keys),
        "videos": ",".join(f"{v:02d}" for v in videos),
        "split_seed": config.seed,
        "split_sha256": _hash_split(split),
        "frame_size": f"{config.frame_size[0]}x{config.frame_size[1]}",
    }
    log.info("data: %d train, %d val, %d test clips from %s (videos %s)", len(train_keys), len(val_keys),
             len(test_keys), selection.source.root, fingerprint["videos"])
    return DataBundle(train=dataset(train_keys, True), val=dataset(val_keys, False), test=dataset(test_keys, False),
                      fingerprint=fingerprint, split=split, cache=cache, source=selection.source)
