"""The full-scale MTL-AQA rehearsal generator, on a shortened subset of the real annotations.

Videos 13 and 14 with their first two clips each: the real frame ranges (clips starting at frames
1,060-5,000), whole videos as long as the last clip plus the margin, dives exactly at the annotated
frames, the real difficulty and score visible, resumption after ``kill -9`` through the real CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

from deepsports.data.annotations import load_annotations, load_split
from deepsports.data.prepare import prepare_cache
from deepsports.data.rehearsal import (
    BROADCAST_SIZE,
    MARGIN_FRAMES,
    REHEARSAL_FPS,
    STATUS_NAME,
    generate_rehearsal,
    rehearsal_dive,
)
from deepsports.data.synth import MARKER, difficulty
from deepsports.data.video import ClipRange, decode_clips
from tests.e2e_helpers import deepsports_cmd, subprocess_env

VIDEOS, CLIPS_PER_VIDEO = (13, 14), 2
CACHE_SIZE = (90, 160)


def _real_files(mtl_aqa_dir: Path) -> dict[str, Path]:
    return {"annotation_path": mtl_aqa_dir / "final_annotations_dict.pkl",
            "train_path": mtl_aqa_dir / "train_split_0.pkl", "test_path": mtl_aqa_dir / "test_split_0.pkl"}


def _first_clips(annotations, video: int, count: int):
    return sorted((c for c in annotations.values() if c.video == video), key=lambda c: c.start_frame)[:count]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, mtl_aqa_dir):
    root = tmp_path_factory.mktemp("rehearsal")
    report = generate_rehearsal(root, videos=VIDEOS, clips_per_video=CLIPS_PER_VIDEO, workers=2,
                                **_real_files(mtl_aqa_dir))
    return root, report, load_annotations(mtl_aqa_dir / "final_annotations_dict.pkl")


def test_layout_holds_the_real_clips_at_their_real_frames(rehearsal, mtl_aqa_dir) -> None:
    root, report, real = rehearsal
    assert sorted(report.written) == list(VIDEOS) and report.reused == ()
    annotations = load_annotations(root / "final_annotations_dict.pkl")
    expected = [c for video in VIDEOS for c in _first_clips(real, video, CLIPS_PER_VIDEO)]
    assert sorted(annotations) == sorted(c.key for c in expected)
    for clip in expected:  # unchanged records: frames, difficulty, score, extras
        assert annotations[clip.key] == clip
    real_train = load_split(mtl_aqa_dir / "train_split_0.pkl")
    train, test = load_split(root / "train_split_0.pkl"), load_split(root / "test_split_0.pkl")
    assert train == [key for key in real_train if key in annotations]  # the real split, in its order
    assert sorted(train + test) == sorted(annotations)
    for video in VIDEOS:
        with av.open(str(root / "whole_videos" / f"{video:02d}.mp4")) as container:
            stream = container.streams.video[0]
            assert (stream.height, stream.width) == BROADCAST_SIZE and stream.average_rate == REHEARSAL_FPS
            frames = sum(1 for _ in container.demux(stream) if _.size)
        last = max(c.end_frame for c in expected if c.video == video)
        assert frames == last + MARGIN_FRAMES
    marker = json.loads((root / MARKER).read_text())
    assert marker["total_frames"] == report.frames_written > 5000 and marker["clips"] == len(expected)


def test_dives_fill_exactly_the_annotated_frames(rehearsal) -> None:
    root, _, _ = rehearsal
    annotations = load_annotations(root / "final_annotations_dict.pkl")
    index = prepare_cache(root, annotations, list(annotations), root / "cache", CACHE_SIZE, workers=0, progress=False)
    assert len(index) == len(annotations) and not index.bad_clips
    for video in VIDEOS:
        clips = sorted((c for c in annotations.values() if c.video == video), key=lambda c: c.start_frame)
        # The frames either side of each clip, and frame 1: the filler.
        outside = [ClipRange(0, 1, 1)] + [ClipRange(2 * i + j + 1, f, f) for i, c in enumerate(clips)
                                          for j, f in enumerate((c.start_frame - 1, c.end_frame + 1))]
        filler = {r.start_frame: res.frames[0].astype(np.int16)
                  for r, res in zip(sorted(outside, key=lambda r: r.start_frame),
                                    decode_clips(root / "whole_videos" / f"{video:02d}.mp4", outside, CACHE_SIZE))}
        reference = filler[1]
        for frame in filler.values():  # a static frame: codec noise only
            assert np.abs(frame - reference).mean() < 1.0
        for clip in clips:
            frames = index.open(clip.key).astype(np.int16)
            assert frames.shape == (clip.num_frames, *CACHE_SIZE, 3)
            # The diver (and later the splash) differs from the empty set in every frame of the clip.
            changed = (np.abs(frames - reference).max(axis=-1) > 40).sum(axis=(1, 2))
            assert changed.min() >= 10, (clip.key, changed.min())


def test_each_dive_shows_the_real_difficulty_and_execution(mtl_aqa_dir) -> None:
    real = load_annotations(mtl_aqa_dir / "final_annotations_dict.pkl")
    # Every DD the synthetic rule can draw (straight up to 3 somersaults, pike 4, tuck 4.5).
    drawable = {difficulty(half / 2, p) for p, most in ((0, 6), (1, 8), (2, 9)) for half in range(2, most + 1)}
    marks, qualities, misses = [], [], []
    for clip in real.values():
        dive = rehearsal_dive(clip)
        shown = difficulty(dive.somersaults, dive.position)
        best = min(abs(d - clip.difficulty) for d in drawable)
        assert abs(shown - clip.difficulty) == pytest.approx(best), (clip.key, clip.difficulty, shown)
        misses.append(best)
        assert dive.entry_quality == dive.form_quality
        marks.append(clip.final_score / clip.difficulty / 3)
        qualities.append(dive.entry_quality)
    order = np.argsort(marks, kind="stable")
    assert np.all(np.diff(np.array(qualities)[order]) >= 0)  # a better real execution is never drawn worse
    assert len(set(qualities)) > 50  # and the qualities spread, so the real ranking is learnable
    assert np.mean(np.array(misses) < 1e-9) > 0.9  # nearly every real DD is drawn exactly


def test_cli_resumes_after_kill_9(tmp_path, mtl_aqa_dir) -> None:
    root = tmp_path / "rehearsal"
    files = [f"--{k.replace('_', '-')}={v}" for k, v in _real_files(mtl_aqa_dir).items()]
    cmd = deepsports_cmd("synth", "--rehearsal", "--out", str(root), "--videos", "13", "14", "--clips-per-video", "1",
                         "--workers", "1", *files)
    env = subprocess_env("sqlite:///unused.db")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = root / STATUS_NAME
    deadline = time.monotonic() + 60
    while not status.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # as the OOM killer or `scancel --signal=KILL` would
    proc.communicate()
    done = json.loads(status.read_text())["videos"]
    assert list(done) == ["13"], done  # the longer video first; the second one was being written
    assert not (root / MARKER).exists()
    video13 = (root / "whole_videos" / "13.mp4").stat()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 video(s) written now, 1 already there" in rerun.stdout
    assert (root / "whole_videos" / "13.mp4").stat().st_mtime_ns == video13.st_mtime_ns
    assert not list((root / "whole_videos").glob(".*.tmp")) and (root / MARKER).exists()


def test_cli_rejects_a_video_the_annotations_lack(tmp_path, mtl_aqa_dir) -> None:
    files = [f"--{k.replace('_', '-')}={v}" for k, v in _real_files(mtl_aqa_dir).items()]
    result = subprocess.run(deepsports_cmd("synth", "--rehearsal", "--out", str(tmp_path / "r"), "--videos", "08", *files),
                            env=subprocess_env("sqlite:///unused.db"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[8]" in lines[0] and "13, 14" in lines[0], result.stderr
