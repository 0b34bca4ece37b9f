"""The PyAV clip cache: exact frames, resume after SIGKILL, idempotence, bad videos, changed inputs.

The videos here are "counter" videos written with PyAV: frame i (0-based) shows i in binary as ten
black/white stripes, so every cached frame can be checked for being exactly the annotated one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from deepsports.data.annotations import ClipAnnotation, save_annotations
from deepsports.data.cache import MANIFEST_NAME, clip_cache_dir, is_temp_file
from deepsports.data.prepare import prepare_cache
from deepsports.errors import DataError

REPO = Path(__file__).resolve().parents[2]
BITS = 10
FRAME_SIZE = (48, 80)  # cache (height, width)


def write_counter_video(path: Path, num_frames: int, *, width: int = 160, height: int = 96, fps: int = 25,
                        gop: int = 12, codec: str = "libx264", invert: bool = False) -> None:
    """Frame i shows i in binary: stripe b (of ten, left to right) is white when bit b is set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for i in range(num_frames):
            img = np.zeros((height, width, 3), np.uint8)
            for bit in range(BITS):
                if ((i >> bit) & 1) != invert:
                    img[:, bit * width // BITS:(bit + 1) * width // BITS] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_counter(frames: np.ndarray, invert: bool = False) -> list[int]:
    """The 0-based decode index each frame of uint8 (T, H, W, 3) shows."""
    _, height, width, _ = frames.shape
    out = []
    for frame in frames:
        value = 0
        for bit in range(BITS):
            white = frame[height // 2, int((bit + 0.5) * width / BITS)].mean() > 127
            if white != invert:
                value |= 1 << bit
        out.append(value)
    return out


def _ann(video: int, clip: int, start: int, end: int) -> ClipAnnotation:
    return ClipAnnotation(video=video, clip=clip, start_frame=start, end_frame=end, difficulty=2.0, final_score=60.0)


def make_counter_dataset(root: Path) -> dict[tuple[int, int], ClipAnnotation]:
    """Three videos: H.264 with B-frames (seeks, overlaps, last frame), mpeg4, a short one."""
    write_counter_video(root / "whole_videos" / "01.mp4", 400)
    write_counter_video(root / "whole_videos" / "02.mp4", 150, codec="mpeg4", gop=30)
    write_counter_video(root / "whole_videos" / "03.mp4", 60, gop=5)
    clips = [(1, 1, 1, 20), (1, 2, 15, 40), (1, 3, 300, 330), (1, 4, 200, 230), (1, 5, 380, 400),
             (2, 1, 1, 1), (2, 2, 50, 90), (2, 3, 120, 150),
             (3, 1, 10, 35), (3, 2, 36, 60)]
    return {(v, c): _ann(v, c, s, e) for v, c, s, e in clips}


@pytest.fixture(scope="module")
def counter_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("counter")
    return root, make_counter_dataset(root)


def _copy_root(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def _clip_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.npy"))}


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


# ---- building the cache -------------------------------------------------------------------------

def test_prepare_caches_exactly_the_annotated_frames(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    index = prepare_cache(root, annotations, list(annotations), tmp_path / "cache", FRAME_SIZE, workers=2, progress=False)
    assert index.num_written == len(annotations) and index.num_reused == 0 and not index.bad_clips
    assert index.directory == clip_cache_dir(tmp_path / "cache", root, FRAME_SIZE)
    assert index.directory.parent.name == "48x80"
    for key, annotation in annotations.items():
        frames = np.load(index.entry(key).path, mmap_mode="r")
        assert isinstance(frames, np.memmap) and frames.dtype == np.uint8
        assert frames.shape == (annotation.num_frames, *FRAME_SIZE, 3)
        # annotation frame f is the f-th decoded frame (ffmpeg's %06d.jpg numbering starts at 1)
        assert read_counter(frames) == list(range(annotation.start_frame - 1, annotation.end_frame)), key
    manifest = _manifest(index.directory)
    assert set(manifest["clips"]) == {f"{v:02d}_{c:04d}" for v, c in annotations}
    entry = manifest["clips"]["01_0003"]
    assert (entry["start_frame"], entry["end_frame"], entry["shape"], entry["status"]) == (300, 330, [31, 48, 80, 3], "ok")
    video = manifest["videos"]["01"]
    stat = (root / "whole_videos" / "01.mp4").stat()
    assert (video["size"], video["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    assert not [p for p in index.directory.iterdir() if is_temp_file(p)]


def test_second_prepare_does_nothing(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    first = prepare_cache(root, annotations, list(annotations), tmp_path, FRAME_SIZE, workers=1, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.directory.glob("*.npy")}
    second = prepare_cache(root, annotations, list(annotations), tmp_path, FRAME_SIZE, workers=2, progress=False)
    assert (second.num_written, second.num_reused) == (0, len(annotations))
    assert {p.name: p.stat().st_mtime_ns for p in second.directory.glob("*.npy")} == stamps
    assert second.clips == first.clips


def test_inline_and_parallel_prepares_are_identical(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    a = prepare_cache(root, annotations, list(annotations), tmp_path / "a", FRAME_SIZE, workers=1, progress=False)
    b = prepare_cache(root, annotations, list(annotations), tmp_path / "b", FRAME_SIZE, workers=3, progress=False)
    assert _clip_files(a.directory) == _clip_files(b.directory)
    assert _manifest(a.directory) == _manifest(b.directory)


# ---- killed and resumed -------------------------------------------------------------------------

# The real prepare, on storage made slow (30 ms per clip write) so the kill reliably lands mid-way.
_PREPARE_SCRIPT = """
import sys, time
import deepsports.data.prepare as prepare
from deepsports.data.annotations import load_annotations
write_clip = prepare.write_clip
def slow_write_clip(path, frames):
    time.sleep(0.03)
    return write_clip(path, frames)
prepare.write_clip = slow_write_clip
annotations = load_annotations(sys.argv[2])
prepare.prepare_cache(sys.argv[1], annotations, sorted(annotations), sys.argv[3], (48, 80), workers=1, progress=False)
"""


def _ok_entries(directory: Path) -> dict:
    try:
        clips = _manifest(directory)["clips"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in clips.items() if v.get("status") == "ok"}


def test_killed_prepare_resumes_and_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    annotations = {}
    for video in (1, 2, 3):
        write_counter_video(root / "whole_videos" / f"{video:02d}.mp4", 420)
        for clip in range(1, 11):
            start = 1 + (clip - 1) * 41
            annotations[(video, clip)] = _ann(video, clip, start, start + 39)
    annotation_path = save_annotations(annotations, tmp_path / "annotations.json")
    cache = tmp_path / "killed"
    directory = clip_cache_dir(cache, root, FRAME_SIZE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", _PREPARE_SCRIPT, str(root), str(annotation_path), str(cache)],
                               env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(_ok_entries(directory)) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, f"prepare ended before it could be killed: {process.stderr.read().decode()}"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    done_at_kill = _ok_entries(directory)
    assert 3 <= len(done_at_kill) < len(annotations), "the kill should land mid-way"
    for entry in done_at_kill.values():  # everything the manifest lists is complete on disk
        assert (directory / entry["file"]).stat().st_size == entry["nbytes"]
    # A writer killed mid-clip leaves a temp file; it is never counted and is cleaned up.
    (directory / ".03_0010.npy.99999.tmp").write_bytes(b"\x93NUMPY partial")

    resumed = prepare_cache(root, annotations, sorted(annotations), cache, FRAME_SIZE, workers=2, progress=False)
    assert resumed.num_reused >= len(done_at_kill) and resumed.num_written >= 1
    assert resumed.num_reused + resumed.num_written == len(annotations) == len(resumed.clips)
    assert not [p for p in directory.iterdir() if is_temp_file(p)]

    clean = prepare_cache(root, annotations, sorted(annotations), tmp_path / "clean", FRAME_SIZE, workers=1, progress=False)
    assert _clip_files(directory) == _clip_files(clean.directory)
    assert len(_clip_files(directory)) == len(annotations)
    assert _manifest(directory)["clips"] == _manifest(clean.directory)["clips"]
    assert _manifest(directory)["videos"] == _manifest(clean.directory)["videos"]


def test_a_clip_file_that_does_not_match_its_manifest_entry_is_recached(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    index = prepare_cache(root, annotations, list(annotations), tmp_path, FRAME_SIZE, workers=1, progress=False)
    damaged = index.entry((1, 2)).path
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    (index.directory / "01_0003.npy").unlink()
    again = prepare_cache(root, annotations, list(annotations), tmp_path, FRAME_SIZE, workers=1, progress=False)
    assert again.num_written == 2
    assert damaged.read_bytes() == good and (index.directory / "01_0003.npy").is_file()


# ---- bad input ----------------------------------------------------------------------------------

def test_corrupt_video_raises_data_error_naming_video_and_clip(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    copy = _copy_root(root, tmp_path / "root")
    video = copy / "whole_videos" / "02.mp4"
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])  # moov atom lost: not a playable mp4
    keys = [k for k in annotations if k[0] == 2]
    with pytest.raises(DataError, match=r"02\.mp4.*(cannot be opened|corrupt).*clip 1") as info:
        prepare_cache(copy, annotations, keys, tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)
    assert "video 02" in str(info.value)


def test_garbled_frame_data_raises_data_error_naming_the_clip(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    copy = _copy_root(root, tmp_path / "root")
    video = copy / "whole_videos" / "01.mp4"
    data = bytearray(video.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 4000, 37):  # damage packets, keep the container intact
        data[i] ^= 0xFF
    video.write_bytes(bytes(data))
    keys = [k for k in annotations if k[0] == 1]
    with pytest.raises(DataError, match=r"01\.mp4.*clip \d+"):
        prepare_cache(copy, annotations, keys, tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)


def test_clip_past_the_end_of_the_video_raises_naming_video_and_clip(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    bad = {**annotations, (3, 3): _ann(3, 3, 50, 75)}  # 03.mp4 has 60 frames
    with pytest.raises(DataError, match=r"clip 3 needs frames 50\.\.75 but video .*03\.mp4.* has only 60 frames"):
        prepare_cache(root, bad, list(bad), tmp_path, FRAME_SIZE, workers=1, progress=False)


def test_missing_video_raises_naming_the_file(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    bad = {**annotations, (7, 1): _ann(7, 1, 1, 10)}
    with pytest.raises(DataError, match=r"whole_videos/07\.mp4.* does not exist.*clip 1"):
        prepare_cache(root, bad, [(7, 1)], tmp_path, FRAME_SIZE, workers=1, progress=False)


def test_unknown_key_raises(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    with pytest.raises(DataError, match=r"\(9, 9\) is not in the annotations"):
        prepare_cache(root, annotations, [(9, 9)], tmp_path, FRAME_SIZE, progress=False)


def test_skip_bad_records_bad_videos_and_clips_and_goes_on(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    copy = _copy_root(root, tmp_path / "root")
    broken = copy / "whole_videos" / "02.mp4"
    broken.write_bytes(broken.read_bytes()[:2000])
    bad = {**annotations, (3, 3): _ann(3, 3, 50, 75), (8, 1): _ann(8, 1, 1, 5)}
    keys = list(bad)
    index = prepare_cache(copy, bad, keys, tmp_path / "cache", FRAME_SIZE, workers=2, skip_bad=True, progress=False)
    bad_keys = {(2, 1), (2, 2), (2, 3), (3, 3), (8, 1)}
    assert set(index.bad_clips) == bad_keys
    assert set(index.clips) == set(keys) - bad_keys
    assert set(index.bad_videos) == {2, 8}
    assert "02.mp4" in index.bad_videos[2] and "07" not in index.bad_videos[2]
    assert "has only 60 frames" in index.bad_clips[(3, 3)]
    manifest = _manifest(index.directory)
    assert manifest["clips"]["03_0003"]["status"] == "bad" and "60 frames" in manifest["clips"]["03_0003"]["error"]
    assert manifest["clips"]["02_0001"]["status"] == "bad"
    # known bad clips are not decoded again; without skip_bad the recorded reason is raised
    again = prepare_cache(copy, bad, keys, tmp_path / "cache", FRAME_SIZE, workers=2, skip_bad=True, progress=False)
    assert again.num_written == 0 and set(again.bad_clips) == bad_keys
    with pytest.raises(DataError, match="02.mp4"):
        prepare_cache(copy, bad, keys, tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)


# ---- changed inputs -----------------------------------------------------------------------------

def test_changed_video_is_recached(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    copy = _copy_root(root, tmp_path / "root")
    first = prepare_cache(copy, annotations, list(annotations), tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)
    video = copy / "whole_videos" / "03.mp4"
    before = video.stat()
    write_counter_video(video, 70, gop=7, invert=True)  # new content, new size
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    assert video.stat().st_size != before.st_size
    second = prepare_cache(copy, annotations, list(annotations), tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)
    assert second.num_written == 2 and second.num_reused == len(annotations) - 2
    frames = second.open((3, 1))
    assert read_counter(frames, invert=True) == list(range(9, 35))
    assert read_counter(first.open((1, 1))) == list(range(0, 20))


def test_touched_video_with_same_size_is_recached(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    copy = _copy_root(root, tmp_path / "root")
    prepare_cache(copy, annotations, list(annotations), tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)
    video = copy / "whole_videos" / "02.mp4"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 1_000_000_000))
    again = prepare_cache(copy, annotations, list(annotations), tmp_path / "cache", FRAME_SIZE, workers=1, progress=False)
    assert again.num_written == 3


def test_changed_annotation_range_is_recached(counter_data, tmp_path: Path) -> None:
    root, annotations = counter_data
    prepare_cache(root, annotations, list(annotations), tmp_path, FRAME_SIZE, workers=1, progress=False)
    moved = {**annotations, (1, 4): replace(annotations[(1, 4)], start_frame=210, end_frame=250)}
    index = prepare_cache(root, moved, list(moved), tmp_path, FRAME_SIZE, workers=1, progress=False)
    assert index.num_written == 1
    assert read_counter(index.open((1, 4))) == list(range(209, 250))
    assert (index.entry((1, 4)).start_frame, index.entry((1, 4)).end_frame) == (210, 250)
