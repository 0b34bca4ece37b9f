"""``ClipDataset``: training samples read from the memory-mapped clip cache (no JPEG, no decoding).

Per item: pick ``frame_num`` frames with the configured frame method, take them from the cached clip
(uint8 (T, H, W, 3) at the original's intermediate 256-px-high 16:9 size, scaled to ``spatial_size``),
then follow the original's geometry:

- ``data_aug``: random ``spatial_size`` square crop of the intermediate frame plus a horizontal flip
  with probability 1/2, the same crop and flip for every frame of the clip (the original applied
  ``RandomCrop`` + ``RandomHorizontalFlip`` to the whole (C, T, H, W) tensor). Evaluation datasets
  (``train=False``) take the centre crop without flip instead, so a model trained on crops is scored
  on the same scale, and reproducibly.
- otherwise: resize the whole 16:9 frame to a ``spatial_size`` square (the original's
  ``T.resize(clip, (S, S))``, which does not keep the aspect ratio).

Items stay uint8: scaling to [0, 1] and, with ``normalize``, subtracting the original's mean and
dividing by its std (:func:`input_affine`) happen on the training device
(:mod:`deepsports.train.video_input`), so workers collate, pin and copy a quarter of the bytes.
(The original normalised before cropping/resizing; both are per-channel affine maps that commute with
crop and with the weight-normalised resize, so the order only changes rounding.)

Randomness: item ``index`` in ``epoch`` draws from ``np.random.default_rng([seed, epoch, index])``
(frames first, then crop top, crop left, flip), so a batch does not depend on the DataLoader's worker
count or order. ``set_epoch`` writes to shared memory, so persistent workers see it too. Evaluation
datasets ignore the epoch: each evaluation sees the same frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from deepsports.config import FRAME_METHODS, Config
from deepsports.data.cache import CacheIndex
from deepsports.data.sampling import sample_indices
from deepsports.errors import DataError

#: The original's RGB statistics on [0, 1] frames.
NORMALIZE_MEAN = (0.2719, 0.4617, 0.5961)
NORMALIZE_STD = (0.1870, 0.1881, 0.2604)

#: 3 judges x 10 points: the original's score normaliser.
SCORE_SCALE = 30.0


def intermediate_size(spatial_size: int) -> tuple[int, int]:
    """The original's intermediate frame (256 x 455 for 224), scaled to ``spatial_size``: (height, width)."""
    height = round(spatial_size * 256 / 224)
    return height, round(height * 16 / 9)


def clip_target(final_score: float, difficulty: float) -> torch.Tensor:
    """The original's regression target [final_score / difficulty / 30, difficulty], float32 (2,)."""
    return torch.tensor([final_score / difficulty / SCORE_SCALE, difficulty], dtype=torch.float32)


def input_affine(normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 (3,) ``scale`` and ``bias`` with ``x * scale + bias`` = x / 255 (then - mean) / std per channel."""
    if normalize:
        std, mean = np.array(NORMALIZE_STD), np.array(NORMALIZE_MEAN)
        scale, bias = 1.0 / (255.0 * std), -mean / std
    else:
        scale, bias = np.full(3, 1.0 / 255.0), np.zeros(3)
    return scale.astype(np.float32), bias.astype(np.float32)


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, C, H, W) -> uint8 (T, C, *size); uint8 channels-last is torch's fast antialiased path."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)


class ClipDataset(Dataset):
    """Clips of the cache as model inputs.

    ``__getitem__(i)`` returns ``dict(video=uint8 (C, T, S, S), target=float32 (2,), video_id=int,
    clip_id=int, final_score=float, difficulty=float)`` with T = ``frame_num``, S = ``spatial_size``.
    ``clips`` are annotations with ``video, clip, start_frame, end_frame, difficulty, final_score``.
    """

    def __init__(self, clips: Sequence[Any], cache: CacheIndex, *, frame_num: int, frame_method: str,
                 spatial_size: int, normalize: bool = False, data_aug: bool = False, seed: int = 0,
                 train: bool = True) -> None:
        if frame_method not in FRAME_METHODS:
            raise DataError(f"frame_method={frame_method!r} is unknown: expected one of {', '.join(FRAME_METHODS)}")
        if frame_num < 1 or spatial_size < 1:
            raise DataError(f"frame_num={frame_num} and spatial_size={spatial_size} must be >= 1")
        missing = [(c.video, c.clip) for c in clips if (c.video, c.clip) not in cache]
        if missing:
            raise DataError(f"{len(missing)} clips are not in the clip cache {str(cache.directory)!r}, e.g. "
                            f"{missing[:5]}; run `deepsports prepare`")
        for c in clips:
            entry = cache.entry((c.video, c.clip))
            if (entry.start_frame, entry.end_frame) != (c.start_frame, c.end_frame):
                raise DataError(f"cached clip {(c.video, c.clip)} holds frames {entry.start_frame}..{entry.end_frame} "
                                f"but the annotation says {c.start_frame}..{c.end_frame}; run `deepsports prepare`")
        self.clips = list(clips)
        self.cache = cache
        self.frame_num, self.frame_method, self.spatial_size = frame_num, frame_method, spatial_size
        self.normalize, self.data_aug, self.seed, self.train = normalize, data_aug, seed, train
        self.crop_size = intermediate_size(spatial_size)
        if data_aug and min(self.crop_size) < spatial_size:
            raise DataError(f"cannot crop {spatial_size} px out of {self.crop_size} frames")
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @staticmethod
    def _channels_first(video: torch.Tensor) -> torch.Tensor:
        """uint8 (T, C, S, S), any strides -> uint8 (C, T, S, S) contiguous (one copy)."""
        return video.permute(1, 0, 2, 3).contiguous()

    @classmethod
    def from_config(cls, config: Config, clips: Sequence[Any], cache: CacheIndex, *, train: bool) -> ClipDataset:
        return cls(clips, cache, frame_num=config.frame_num, frame_method=config.frame_method,
                   spatial_size=config.spatial_size, normalize=config.normalize, data_aug=config.data_aug,
                   seed=config.seed, train=train)

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(c.video, c.clip) for c in self.clips]

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (training datasets; evaluation ones stay fixed)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.clips)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if self.train else 0, index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.clips):
            raise IndexError(f"index {index} out of range for {len(self.clips)} clips")
        clip = self.clips[index]
        rng = self.rng(index)
        frames = self.cache.open((clip.video, clip.clip))  # uint8 (T_clip, H, W, 3), memory-mapped
        idx = sample_indices(self.frame_method, frames.shape[0], self.frame_num, 0, rng)
        size = self.spatial_size
        if self.data_aug:
            crop_h, crop_w = self.crop_size
            if self.train:
                top, left = int(rng.integers(0, crop_h - size + 1)), int(rng.integers(0, crop_w - size + 1))
                flip = bool(rng.random() < 0.5)
            else:
                top, left, flip = (crop_h - size) // 2, (crop_w - size) // 2, False
            if tuple(frames.shape[1:3]) == self.crop_size:
                # Read only the crop from the memory map.
                video = torch.from_numpy(np.ascontiguousarray(frames[idx, top:top + size, left:left + size]))
                video = video.permute(0, 3, 1, 2)
            else:
                video = _resize(torch.from_numpy(frames[idx]).permute(0, 3, 1, 2), self.crop_size)
                video = video[..., top:top + size, left:left + size]
            if flip:
                video = video.flip(-1)
        else:
            video = _resize(torch.from_numpy(frames[idx]).permute(0, 3, 1, 2), (size, size))
        return {"video": self._channels_first(video), "target": clip_target(clip.final_score, clip.difficulty),
                "video_id": int(clip.video), "clip_id": int(clip.clip), "final_score": float(clip.final_score),
                "difficulty": float(clip.difficulty)}
