"""uint8 batches converted on the device give the float inputs the dataset used to return.

The reference is the former ``ClipDataset._to_float`` (float32 ``x * scale + bias`` per item, in the
DataLoader's workers) and the exact value in float64. The tolerance comes from float32 rounding: the
constants ``scale`` and ``bias`` and the two operations each round once, by at most half an ulp of
their magnitude, so ``|float32 result - exact| <= eps * (|x * scale| + |bias| + |result|)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepsports.data import ClipDataset
from deepsports.data.annotations import ClipAnnotation
from deepsports.data.cache import CachedClip, CacheIndex, write_clip
from deepsports.data.dataset import NORMALIZE_MEAN, NORMALIZE_STD, input_affine, intermediate_size
from deepsports.errors import DataError
from deepsports.train.video_input import VideoInput

S = 32
EPS = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def noise_cache(tmp_path_factory) -> tuple[CacheIndex, list[ClipAnnotation]]:
    """Clips of random pixels (every uint8 value occurs) at the crop geometry."""
    directory = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    clips, entries = [], {}
    for clip in range(1, 6):
        frames = rng.integers(0, 256, size=(12, *intermediate_size(S), 3), dtype=np.uint8)
        path = directory / f"01_{clip:04d}.npy"
        write_clip(path, frames)
        clips.append(ClipAnnotation(video=1, clip=clip, start_frame=10, end_frame=21, difficulty=2.0, final_score=50.0))
        entries[(1, clip)] = CachedClip(path, 10, 21, frames.shape)
    return CacheIndex(directory=directory, frame_size=intermediate_size(S), clips=entries), clips


def _former_items(dataset: ClipDataset, normalize: bool) -> torch.Tensor:
    """What the dataset returned before: each item converted to float32 in the worker (the removed code)."""
    scale, bias = (a.reshape(3, 1, 1, 1) for a in input_affine(normalize))
    out = []
    for index in range(len(dataset)):
        frames = dataset[index]["video"].numpy()
        item = np.empty(frames.shape, dtype=np.float32)
        np.copyto(item, frames, casting="unsafe")
        item *= scale
        item += bias
        out.append(torch.from_numpy(item))
    return torch.stack(out)


def _exact(video: torch.Tensor, normalize: bool) -> np.ndarray:
    x = video.numpy().astype(np.float64) / 255.0
    if not normalize:
        return x
    return (x - np.array(NORMALIZE_MEAN).reshape(1, 3, 1, 1, 1)) / np.array(NORMALIZE_STD).reshape(1, 3, 1, 1, 1)


@pytest.mark.parametrize("data_aug", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_uint8_batches_give_the_former_float_inputs(noise_cache, data_aug: bool, normalize: bool) -> None:
    cache, clips = noise_cache
    dataset = ClipDataset(clips, cache, frame_num=6, frame_method="spaced_varied_new", spatial_size=S,
                          normalize=normalize, data_aug=data_aug, seed=5)
    dataset.set_epoch(2)
    # The default DataLoader settings: two worker processes collate the uint8 clips.
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    raw = torch.cat([batch["video"] for batch in batches])
    assert raw.dtype == torch.uint8 and raw.shape == (len(clips), 3, 6, S, S)
    converted = torch.cat([VideoInput(normalize)(batch["video"]) for batch in batches])
    assert converted.dtype == torch.float32 and converted.shape == raw.shape
    former = _former_items(dataset, normalize)
    exact = _exact(raw, normalize)
    scale, bias = (a.astype(np.float64).reshape(1, 3, 1, 1, 1) for a in input_affine(normalize))
    bound = EPS * (np.abs(raw.numpy() * scale) + np.abs(bias) + np.abs(exact))
    assert np.all(np.abs(converted.numpy() - exact) <= bound)
    assert np.all(np.abs(former.numpy() - exact) <= bound)
    assert np.all(np.abs(converted.numpy() - former.numpy()) <= 2 * bound)
    if not normalize:
        assert torch.equal(torch.round(converted * 255).to(torch.uint8), raw)  # x / 255, nothing else


def test_float_input_is_only_moved_and_bad_input_is_named() -> None:
    video_input = VideoInput(True)
    floats = torch.rand(2, 3, 4, 8, 8)
    assert video_input(floats) is floats
    with pytest.raises(DataError, match=r"uint8 \(B, 3, T, H, W\).*torch.int16 \(2, 3, 4, 8, 8\)"):
        video_input(torch.zeros(2, 3, 4, 8, 8, dtype=torch.int16))
    assert not VideoInput(True).state_dict()  # nothing of it lands in checkpoints
