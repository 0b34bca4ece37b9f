"""ClipDataset and build_datasets: geometry, sampling through the cache, determinism, the recorded split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from deepsports.config import build_config
from deepsports.data import ClipDataset, build_datasets, prepare_cache, sample_indices, split_train_val
from deepsports.data.annotations import ClipAnnotation, annotation_fingerprint, save_annotations, save_split
from deepsports.data.cache import CachedClip, CacheIndex, write_clip
from deepsports.data.dataset import intermediate_size
from deepsports.errors import DataError
from tests.data.test_prepare import make_counter_dataset, read_counter

S = 32
CROP = intermediate_size(S)  # (37, 66): the original's 256 x 455 scaled to 32 px


def test_intermediate_size_is_the_originals_256_by_455_at_224() -> None:
    assert intermediate_size(224) == (256, 455)
    assert intermediate_size(112) == (128, 228) == build_config({"spatial_size": 112, "data_aug": True}).frame_size


# ---- a "coordinate" clip: R = column, G = row, B = 10 x frame index --------------------------------

@pytest.fixture()
def coordinate_cache(tmp_path: Path) -> tuple[CacheIndex, list[ClipAnnotation]]:
    height, width = CROP
    num_frames = 20
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[..., 0], frames[..., 1] = cols, rows
    frames[..., 2] = (10 * np.arange(num_frames))[:, None, None]
    clips, entries = [], {}
    for clip in (1, 2, 3):
        path = tmp_path / f"01_{clip:04d}.npy"
        write_clip(path, frames)
        annotation = ClipAnnotation(video=1, clip=clip, start_frame=101, end_frame=120, difficulty=2.5,
                                    final_score=60.0 + clip)
        clips.append(annotation)
        entries[(1, clip)] = CachedClip(path, 101, 120, frames.shape)
    return CacheIndex(directory=tmp_path, frame_size=CROP, clips=entries), clips


def _pixels(video: torch.Tensor) -> np.ndarray:
    """uint8 (C, T, S, S) -> int64 (T, S, S, C)."""
    assert video.dtype == torch.uint8
    return video.permute(1, 2, 3, 0).numpy().astype(np.int64)


def _dataset(cache, clips, **kw) -> ClipDataset:
    args = dict(frame_num=6, frame_method="spaced_varied_new", spatial_size=S, normalize=False, data_aug=True, seed=7)
    return ClipDataset(clips, cache, **{**args, **kw})


def test_item_shapes_dtypes_and_targets(coordinate_cache) -> None:
    cache, clips = coordinate_cache
    item = _dataset(cache, clips)[1]
    assert item["video"].shape == (3, 6, S, S) and item["video"].dtype == torch.uint8  # converted on the device
    assert item["video"].is_contiguous()
    assert item["target"].dtype == torch.float32
    # [final_score / difficulty / 30, difficulty]: 62 / 2.5 / 30
    assert torch.allclose(item["target"], torch.tensor([62.0 / 2.5 / 30.0, 2.5]))
    assert (item["video_id"], item["clip_id"], item["final_score"], item["difficulty"]) == (1, 2, 62.0, 2.5)


def test_train_crop_and_flip_follow_the_documented_draws(coordinate_cache) -> None:
    cache, clips = coordinate_cache
    dataset = _dataset(cache, clips)
    flips = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(clips)):
            rng = np.random.default_rng([7, epoch, index])  # frames, then top, left, flip
            frames = sample_indices("spaced_varied_new", 20, 6, 0, rng)
            top, left = int(rng.integers(0, CROP[0] - S + 1)), int(rng.integers(0, CROP[1] - S + 1))
            flip = bool(rng.random() < 0.5)
            flips.add(flip)
            pixels = _pixels(dataset[index]["video"])
            columns = np.arange(left, left + S)[::-1] if flip else np.arange(left, left + S)
            for t, frame in enumerate(frames):  # the same crop and flip for every frame
                assert np.array_equal(pixels[t, :, :, 0], np.broadcast_to(columns, (S, S)))
                assert np.array_equal(pixels[t, :, :, 1], np.broadcast_to(np.arange(top, top + S)[:, None], (S, S)))
                assert np.all(pixels[t, :, :, 2] == 10 * frame)
    assert flips == {True, False}


def test_evaluation_takes_the_centre_crop_and_ignores_the_epoch(coordinate_cache) -> None:
    cache, clips = coordinate_cache
    dataset = _dataset(cache, clips, train=False)
    first = dataset[0]["video"]
    dataset.set_epoch(5)
    assert torch.equal(dataset[0]["video"], first)
    pixels = _pixels(first)
    top, left = (CROP[0] - S) // 2, (CROP[1] - S) // 2
    assert np.array_equal(pixels[0, 0, :, 0], np.arange(left, left + S))
    assert np.array_equal(pixels[0, :, 0, 1], np.arange(top, top + S))


def test_without_data_aug_the_whole_frame_is_squeezed_to_a_square(coordinate_cache) -> None:
    cache, clips = coordinate_cache
    dataset = _dataset(cache, clips, data_aug=False, frame_method="spaced_fixed")
    pixels = _pixels(dataset[0]["video"])
    # spaced_fixed: 20 frames, 6 samples, step 3.33 -> 0, 3, 6, 10, 13, 16
    assert [int(np.median(pixels[t, :, :, 2])) // 10 for t in range(6)] == [0, 3, 6, 10, 13, 16]
    assert np.abs(pixels[..., 2] - pixels[:, :1, :1, 2]).max() <= 1  # each frame stays one colour
    red = pixels[0, S // 2, :, 0]
    assert red[0] <= 2 and red[-1] >= CROP[1] - 3 and np.all(np.diff(red) > 0)  # all 66 columns in 32 px
    green = pixels[0, :, S // 2, 1]
    assert green[0] <= 1 and green[-1] >= CROP[0] - 2


def test_items_stay_uint8_whatever_normalize(coordinate_cache) -> None:
    """Normalisation happens on the training device (tests/train/test_video_input.py), not in the workers."""
    cache, clips = coordinate_cache
    assert torch.equal(_dataset(cache, clips)[2]["video"], _dataset(cache, clips, normalize=True)[2]["video"])


def test_dataset_refuses_clips_the_cache_lacks_or_holds_with_another_range(coordinate_cache) -> None:
    cache, clips = coordinate_cache
    stranger = ClipAnnotation(video=4, clip=1, start_frame=1, end_frame=20, difficulty=2.0, final_score=50.0)
    with pytest.raises(DataError, match=r"not in the clip cache.*\(4, 1\)"):
        _dataset(cache, [stranger])
    moved = ClipAnnotation(video=1, clip=1, start_frame=100, end_frame=119, difficulty=2.5, final_score=61.0)
    with pytest.raises(DataError, match=r"holds frames 101\.\.120 but the annotation says 100\.\.119"):
        _dataset(cache, [moved])
    with pytest.raises(DataError, match="frame_method='sparse'"):
        _dataset(cache, clips, frame_method="sparse")


# ---- through PyAV and the real cache -----------------------------------------------------------------

@pytest.fixture(scope="module")
def counter_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[CacheIndex, dict, Path]:
    root = tmp_path_factory.mktemp("counter")
    annotations = make_counter_dataset(root)
    cache = prepare_cache(root, annotations, sorted(annotations), root / "cache", intermediate_size(64), workers=1,
                          progress=False)
    return cache, annotations, root


def test_items_show_the_sampled_frames_of_the_annotated_clip(counter_cache) -> None:
    cache, annotations, _ = counter_cache
    clips = [annotations[key] for key in sorted(annotations)]
    dataset = ClipDataset(clips, cache, frame_num=5, frame_method="spaced_fixed", spatial_size=64)
    for index, clip in enumerate(clips):
        frames = _pixels(dataset[index]["video"]).astype(np.uint8)
        # the original's absolute frame numbers; the counter shows the 0-based decode index (frame - 1)
        expected = sample_indices("spaced_fixed", clip.num_frames, 5, clip.start_frame, None) - 1
        assert read_counter(frames) == expected.tolist(), clip.key


def _batches(dataset: ClipDataset, num_workers: int, epochs=(0,), persistent: bool = False) -> list[dict]:
    loader = DataLoader(dataset, batch_size=3, shuffle=False, num_workers=num_workers,
                        persistent_workers=persistent and num_workers > 0)
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.extend(loader)
    return out


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["target"], y["target"])
        assert torch.equal(x["clip_id"], y["clip_id"])


def test_items_do_not_depend_on_the_number_of_workers(counter_cache) -> None:
    cache, annotations, _ = counter_cache
    clips = [annotations[key] for key in sorted(annotations)]
    dataset = ClipDataset(clips, cache, frame_num=4, frame_method="spaced_varied_new", spatial_size=S,
                          normalize=True, data_aug=True, seed=3)
    serial = _batches(dataset, 0, epochs=(0, 1))
    _assert_same_batches(serial, _batches(dataset, 2, epochs=(0, 1)))
    # set_epoch reaches persistent workers too
    _assert_same_batches(serial, _batches(dataset, 2, epochs=(0, 1), persistent=True))
    half = len(serial) // 2
    assert not all(torch.equal(a["video"], b["video"]) for a, b in zip(serial[:half], serial[half:]))
    other_seed = ClipDataset(clips, cache, frame_num=4, frame_method="spaced_varied_new", spatial_size=S,
                             normalize=True, data_aug=True, seed=4)
    assert not torch.equal(other_seed[0]["video"], dataset[0]["video"])


# ---- build_datasets ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mtl_layout(counter_cache) -> dict[str, str]:
    """The counter videos as an MTL-AQA directory: whole_videos/ + annotation and split pickles."""
    _, annotations, root = counter_cache
    save_annotations(annotations, root / "final_annotations_dict.pkl")
    train = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (3, 2)]
    save_split(train, root / "train_split_0.pkl")
    save_split([(1, 5), (2, 3)], root / "test_split_0.pkl")
    return {"dataset": "mtl_aqa", "root_dir": str(root), "annotation_path": str(root / "final_annotations_dict.pkl"),
            "train_path": str(root / "train_split_0.pkl"), "test_path": str(root / "test_split_0.pkl"),
            "spatial_size": S, "patch_size": 16, "frame_num": 4, "train_val_split_ratio": 0.75}


def test_build_datasets_splits_the_train_split_with_the_seed_and_records_it(mtl_layout, tmp_path: Path) -> None:
    config = build_config({**mtl_layout, "cache_dir": str(tmp_path), "seed": 1})
    bundle = build_datasets(config, progress=False)
    train, val, test = (set(map(tuple, bundle.split[name])) for name in ("train", "val", "test"))
    assert (len(train), len(val)) == (6, 2) and not train & val
    assert train | val == {(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (3, 2)}
    assert test == {(1, 5), (2, 3)}
    assert set(bundle.train.keys) == train and set(bundle.val.keys) == val and set(bundle.test.keys) == test
    assert bundle.train.train and not bundle.val.train and not bundle.test.train
    assert bundle.fingerprint["annotations_sha256"] == annotation_fingerprint(mtl_layout["annotation_path"])
    assert (bundle.fingerprint["num_train"], bundle.fingerprint["num_val"], bundle.fingerprint["num_test"]) == (6, 2, 2)
    assert bundle.cache.directory.parent.name == f"{S}x{S}"  # cache_geometry=fit without data_aug
    item = bundle.test[0]
    assert item["video"].shape == (3, 4, S, S)
    again = build_datasets(config, progress=False)
    assert again.split == bundle.split and again.fingerprint == bundle.fingerprint
    assert again.cache.num_written == 0
    other = build_datasets(config.replace(seed=2), progress=False)
    assert other.split["val"] != bundle.split["val"] and other.split["test"] == bundle.split["test"]
    assert other.fingerprint["split_sha256"] != bundle.fingerprint["split_sha256"]


@pytest.mark.parametrize("overrides,frame_size", [
    ({}, (S, S)),  # fit, no data_aug: the squeezed square training reads
    ({"data_aug": True}, CROP),  # fit with crops: the 16:9 frame they are cut from
    ({"cache_geometry": "original"}, (256, 455)),  # the original's intermediate, whatever spatial_size
    ({"cache_height": 40}, (40, 71)),  # explicit pixels win
])
def test_cache_geometry_follows_what_training_reads(mtl_layout, tmp_path: Path, overrides, frame_size) -> None:
    config = build_config({**mtl_layout, "cache_dir": str(tmp_path), **overrides})
    assert config.frame_size == frame_size
    bundle = build_datasets(config, progress=False)
    height, width = frame_size
    assert bundle.cache.frame_size == frame_size and bundle.cache.directory.parent.name == f"{height}x{width}"
    for entry in bundle.cache.clips.values():
        assert entry.shape == (entry.end_frame - entry.start_frame + 1, height, width, 3)
        assert entry.path.stat().st_size == 128 + entry.num_frames * height * width * 3  # .npy header + pixels
    # Whatever the cache holds, training reads the same frames at the same size (crops cut the stripes).
    for dataset in (bundle.train, bundle.test):
        for index in range(len(dataset)):
            item = dataset[index]
            assert item["video"].shape == (3, 4, S, S) and item["video"].dtype == torch.uint8
            clip = dataset.clips[index]
            if config.data_aug:
                continue
            expected = sample_indices("spaced_fixed", clip.num_frames, 4, clip.start_frame, None) - 1
            assert read_counter(item["video"].permute(1, 2, 3, 0).numpy()) == expected.tolist(), clip.key


def test_build_datasets_filters_videos(mtl_layout, tmp_path: Path) -> None:
    bundle = build_datasets(build_config({**mtl_layout, "cache_dir": str(tmp_path), "videos": "01 03"}), progress=False)
    keys = {tuple(k) for name in ("train", "val", "test") for k in bundle.split[name]}
    assert {k[0] for k in keys} == {1, 3} and bundle.fingerprint["videos"] == "01,03"
    with pytest.raises(DataError, match=r"video\(s\) 05 have no clips.*videos with clips: 01, 02, 03"):
        build_datasets(build_config({**mtl_layout, "cache_dir": str(tmp_path), "videos": "01 05"}), progress=False)


def test_split_train_val_needs_a_clip_on_each_side() -> None:
    keys = [(1, c) for c in range(4)]
    train, val = split_train_val(keys, 0.5, seed=0)
    assert len(train) == 2 and sorted(train + val) == keys
    assert split_train_val(list(reversed(keys)), 0.5, seed=0) == (train, val)  # file order does not matter
    with pytest.raises(DataError, match="both need at least one"):
        split_train_val(keys[:1], 0.8, seed=0)


def test_build_datasets_on_the_synthetic_dataset(synth_data, tmp_path: Path) -> None:
    """dataset=synthetic finds the generated dataset under the cache dir; every clip, each video's last one
    included, fits its video with the 1-based frame numbers (synth writes a hold frame after each clip)."""
    from deepsports.data.annotations import load_annotations, load_split

    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "n48_s0").symlink_to(synth_data.root, target_is_directory=True)
    config = build_config({"cache_dir": str(tmp_path), "synth_clips": 48, "synth_seed": 0, "spatial_size": S,
                           "patch_size": 16, "frame_num": 4, "normalize": True, "data_aug": True})
    bundle = build_datasets(config, progress=False)
    annotations = load_annotations(synth_data.annotation_path)
    train_split = load_split(synth_data.train_path, annotations)
    assert len(bundle.train) + len(bundle.val) == len(train_split)
    assert len(bundle.train) == int(len(train_split) * config.train_val_split_ratio)
    assert set(bundle.test.keys) == set(load_split(synth_data.test_path, annotations))
    assert bundle.cache.num_written == len(annotations) and not bundle.cache.bad_clips
    assert bundle.fingerprint["dataset"] == "synthetic"
    for dataset in (bundle.train, bundle.test):
        item = dataset[len(dataset) - 1]
        annotation = annotations[(item["video_id"], item["clip_id"])]
        assert item["video"].shape == (3, 4, S, S) and torch.isfinite(item["video"]).all()
        expected = [annotation.final_score / annotation.difficulty / 30.0, annotation.difficulty]
        assert torch.allclose(item["target"], torch.tensor(expected, dtype=torch.float32))
    assert build_datasets(config, progress=False).cache.num_reused == len(annotations)
