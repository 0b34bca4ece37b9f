"""Synthetic diving dataset: MTL-AQA layout, the visible rule, determinism, idempotent and atomic writing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.stats import spearmanr

from deepsports.data.annotations import load_annotations, load_split, video_filename
from deepsports.data.synth import (
    MARKER,
    SynthDataset,
    difficulty,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    synthetic_dataset_dir,
)
from deepsports.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def decode(path: Path) -> np.ndarray:
    """All frames of a video, uint8 (N, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def loaded(synth_data: SynthDataset):
    annotations = load_annotations(synth_data.annotation_path)
    details = {(d["video"], d["clip"]): d for d in json.loads(synth_data.details_path.read_text())["clips"]}
    videos = {video: decode(synth_data.videos_dir / video_filename(video)) for video in {k[0] for k in annotations}}
    return annotations, details, videos


def clip_frames(videos, clip) -> np.ndarray:
    """Frames start_frame..end_frame (numbered from 1) of a clip."""
    return videos[clip.video][clip.start_frame - 1:clip.end_frame]


# --- layout --------------------------------------------------------------------------------------

def test_loads_through_the_mtl_aqa_importer(synth_data, loaded, mtl_aqa_dir):
    annotations, details, videos = loaded
    train = load_split(synth_data.train_path, annotations)
    test = load_split(synth_data.test_path, annotations)
    assert len(annotations) == 48 and sorted(train + test) == sorted(annotations)
    assert len(test) == 12  # 25 %
    real = next(iter(load_annotations(mtl_aqa_dir / "final_annotations_dict.pkl").values()))
    for key, clip in annotations.items():
        assert set(clip.extra) == set(real.extra)  # the same fields as the real file
        assert 24 <= clip.num_frames <= 40
        assert type(clip.difficulty) is float and 1.6 <= clip.difficulty <= 3.7
        assert 0 <= clip.final_score <= 111
        d = details[key]
        assert clip.difficulty == difficulty(d["somersaults"], d["position"])
        assert clip.final_score == round(sum(d["judges"]) * clip.difficulty, 2)
        assert clip.extra["ss_no"] == 2 * d["somersaults"] and clip.extra["position"] == d["position"]
        assert all(0 <= mark <= 10 and mark * 2 == int(mark * 2) for mark in d["judges"])
    for video, frames in videos.items():
        clips = sorted((c for c in annotations.values() if c.video == video), key=lambda c: c.start_frame)
        assert [c.clip for c in clips] == list(range(1, len(clips) + 1))
        assert clips[0].start_frame >= 2 and clips[-1].end_frame < len(frames)
        assert all(b.start_frame - a.end_frame > 4 for a, b in zip(clips, clips[1:]))  # gaps between dives


def test_videos_are_real_h264_files(synth_data, loaded):
    _, _, videos = loaded
    expected = "h264" if "libx264" in av.codecs_available else "mpeg4"
    for video in videos:
        with av.open(str(synth_data.videos_dir / video_filename(video))) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == expected and stream.codec_context.pix_fmt == "yuv420p"
            assert (stream.codec_context.width, stream.codec_context.height) == (228, 128)
            assert stream.average_rate == 25
    assert "DD = 1.0 + 0.6 * s" in synth_data.rules_path.read_text()


def test_hold_frames_repeat_the_ends_of_each_clip(loaded):
    annotations, _, videos = loaded
    for clip in annotations.values():
        frames = videos[clip.video]
        before, first = frames[clip.start_frame - 2], frames[clip.start_frame - 1]
        last, after = frames[clip.end_frame - 1], frames[clip.end_frame]
        empty = frames[clip.start_frame - 4]  # inside the gap: no diver
        assert np.abs(before.astype(int) - first).mean() < 1.0
        assert np.abs(after.astype(int) - last).mean() < 1.0
        assert _diver_pixels(first) > 40 and _diver_pixels(empty) == 0


# --- the rule is visible in the decoded frames ----------------------------------------------------

def _diver_pixels(frame: np.ndarray) -> np.ndarray:
    r, g, b = (frame[..., i].astype(int) for i in range(3))
    return ((r > 190) & (g > 100) & (b < 140)).sum()  # orange body or yellow head; not white, grey or blue


def _splash_pixels(frame: np.ndarray) -> int:
    return int((frame.min(axis=-1) > 200).sum())  # white: splash, foam and the board (subtracted by the caller)


def test_bigger_entry_errors_make_bigger_splashes(loaded):
    annotations, details, videos = loaded
    miss, white = [], []
    for key, clip in annotations.items():
        frames = clip_frames(videos, clip)
        d = details[key]
        miss.append(1 - d["entry_quality"])
        white.append(np.mean([_splash_pixels(f) for f in frames[-3:]]) - _splash_pixels(frames[0]))
    assert spearmanr(miss, white)[0] > 0.9
    assert min(white) > 0


def test_more_somersaults_fly_higher_longer_and_farther(loaded):
    annotations, details, videos = loaded
    somersaults, apex, airborne, reach = [], [], [], []
    for key, clip in annotations.items():
        frames = clip_frames(videos, clip)
        masks = [(f[..., 0] > 190) & (f[..., 1] > 100) & (f[..., 2] < 140) for f in frames]
        centres = [np.argwhere(m).mean(axis=0) for m in masks if m.sum() > 20]  # (y, x) of the visible diver
        splash = (frames[-1].min(axis=-1) > 200) & ~(frames[0].min(axis=-1) > 200)
        somersaults.append(details[key]["somersaults"])
        apex.append(min(y for y, _ in centres))  # smaller y is higher
        airborne.append(sum(abs(x - centres[0][1]) > 4 for _, x in centres))  # frames away from the board tip
        reach.append(abs(np.argwhere(splash)[:, 1].mean() - centres[0][1]))  # board tip to splash
    assert spearmanr(somersaults, apex)[0] < -0.6
    assert spearmanr(somersaults, airborne)[0] > 0.85
    assert spearmanr(somersaults, reach)[0] > 0.8


def test_score_follows_the_rule_in_ranks(loaded):
    annotations, details, _ = loaded
    dd = [c.difficulty for c in annotations.values()]
    quality = [0.55 * details[k]["entry_quality"] + 0.45 * details[k]["form_quality"] for k in annotations]
    predicted = np.array(dd) * (3 + 6.5 * np.array(quality)) * 3
    assert spearmanr(predicted, [c.final_score for c in annotations.values()])[0] > 0.95


def test_difficulty_table():
    # DD = 1.0 + 0.6 s + {tuck 0, pike 0.2, straight 0.4}, as the rule documents
    assert (difficulty(1.0, 2), difficulty(4.5, 2), difficulty(4.0, 1), difficulty(2.5, 0)) == (1.6, 3.7, 3.6, 2.9)
    assert all(difficulty(s, 2) < difficulty(s, 1) < difficulty(s, 0) for s in (1.0, 2.0, 3.0))
    assert all(difficulty(s, 2) < difficulty(s + 0.5, 2) for s in np.arange(1.0, 4.5, 0.5))
    for args in [(0.5, 2), (5.0, 2), (1.25, 1), (2.0, 3)]:
        with pytest.raises(ConfigError, match="no synthetic dive"):
            difficulty(*args)


# --- determinism, idempotence, atomicity --------------------------------------------------------

def test_same_seed_same_bytes_whatever_the_workers(tmp_path, capsys):
    one = generate_synthetic_dataset(tmp_path / "a", n_clips=8, seed=7, workers=1, progress=True)
    # stderr is no terminal here: no tqdm bar (its carriage returns would pile up in a log file)
    assert "synthetic dives" not in capsys.readouterr().err
    two = generate_synthetic_dataset(tmp_path / "b", n_clips=8, seed=7, workers=2, progress=False)
    for name in ("final_annotations_dict.pkl", "train_split_0.pkl", "test_split_0.pkl", "dives.json"):
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes()
    videos = sorted(p.name for p in one.videos_dir.iterdir())
    assert videos == sorted(p.name for p in two.videos_dir.iterdir()) and videos == ["01.mp4", "02.mp4"]
    for name in videos:
        assert np.array_equal(decode(one.videos_dir / name), decode(two.videos_dir / name))
    other = generate_synthetic_dataset(tmp_path / "c", n_clips=8, seed=8, workers=1, progress=False)
    assert load_annotations(other.annotation_path) != load_annotations(one.annotation_path)
    assert not np.array_equal(decode(other.videos_dir / "01.mp4")[:50], decode(one.videos_dir / "01.mp4")[:50])


def test_idempotent_and_half_written_dirs_are_regenerated(tmp_path):
    root = synthetic_dataset_dir(tmp_path, 8, 1)
    assert ensure_synthetic_dataset(tmp_path, 8, 1, progress=False) == root
    stamp = (root / "final_annotations_dict.pkl").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, 8, 1, progress=False) == root
    assert generate_synthetic_dataset(root, n_clips=8, seed=1, workers=1, progress=False).root == root
    assert (root / "final_annotations_dict.pkl").stat().st_mtime_ns == stamp  # not rewritten

    (root / MARKER).unlink()  # as if a run died after writing some files
    (root / "whole_videos" / "01.mp4").write_bytes(b"truncated")
    ensure_synthetic_dataset(tmp_path, 8, 1, progress=False)
    assert (root / MARKER).is_file() and len(decode(root / "whole_videos" / "01.mp4")) > 100
    assert sorted(p.name for p in root.parent.iterdir() if not p.name.startswith(".")) == [root.name]


def test_a_killed_generation_leaves_nothing_half_written(tmp_path):
    root = tmp_path / "synthetic" / "killed"
    code = ("from deepsports.data.synth import generate_synthetic_dataset as g\n"
            f"g({str(root)!r}, n_clips=200, seed=0, workers=1, progress=False)\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "synthetic").glob(".killed.tmp-*/whole_videos/*.mp4")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not root.exists()  # the target only ever appears complete
    generate_synthetic_dataset(root, n_clips=8, seed=0, workers=1, progress=False)
    assert (root / MARKER).is_file()
    assert [p.name for p in (tmp_path / "synthetic").iterdir() if ".tmp-" in p.name] == []  # stale temp removed


def test_refuses_to_replace_a_foreign_directory_and_bad_parameters(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        generate_synthetic_dataset(tmp_path / "mine", n_clips=24, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for kwargs, needle in [({"n_clips": 3}, "n_clips=3"), ({"seed": -1}, "seed=-1"), ({"width": 227}, "width=227"),
                           ({"height": 32}, "height=32"), ({"fps": 0}, "fps=0"), ({"n_clips": 24.0}, "n_clips=24.0")]:
        with pytest.raises(ConfigError, match=needle):
            generate_synthetic_dataset(tmp_path / "x", **{"n_clips": 24, **kwargs}, progress=False)
    assert not (tmp_path / "x").exists()
