"""A full-scale MTL-AQA rehearsal: the real annotation and split files over synthetic whole videos.

No real MTL-AQA video can be downloaded here, but its annotation and split pickles can: they fix
the dataset's real shape (15 whole broadcast videos, 1,412 clips of 55-274 frames, 151,364 annotated
frames, clips as late as frame ~290,000). This module writes, for each video named by the
annotations, ``whole_videos/NN.mp4`` as long as its last annotated frame plus :data:`MARGIN_FRAMES`, at
30 fps and broadcast geometry (:data:`BROADCAST_SIZE`), holding a synthetic dive
(:mod:`deepsports.data.synth_render`) at every annotated ``start_frame..end_frame`` and a static
filler frame everywhere else. The pickles are copied byte for byte, so importer -> ``prepare`` ->
training run exactly the users' path and the clips' real difficulty and score drive what is drawn:

* difficulty: the dive whose synthetic DD (:func:`deepsports.data.synth.difficulty`: somersaults and
  position) is nearest to the real one (the synthetic rule spans 1.6..3.7 in steps of 0.1);
* execution: both hidden qualities set from the real mean judge's mark ``final_score / DD / 3``
  through the synthetic rule's ``mark = 3 + 6.5 q`` (clipped to 0..1), so splash size and form follow
  the real score and the real ranking is learnable;
* time: a dive's ~24-40 rendered frames are stretched over the clip's real length (nearest frame).

Cost: 2.36 M frames. The filler is one static frame; the video is a grid of closed GOPs of
:data:`KEYINT` frames (libx264 ``ultrafast``), and a GOP without a dive reuses the packets of one
filler GOP encoded once per video, so only the ~1,400-2,800 GOPs that touch a dive are encoded
(about 0.4 M frames, mostly filler that x264 turns into skip blocks). Resumable per video: each video is written under a
temporary name and renamed; ``rehearsal.json`` records finished videos with their encode time, and a
rerun skips them. ``.complete`` is written last.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from deepsports.data.annotations import (
    ClipAnnotation,
    load_annotations,
    load_split,
    save_annotations,
    save_split,
    shipped_annotation_files,
)
from deepsports.data.synth import MARKER, difficulty, sample_scene
from deepsports.data.synth_render import Canvas, Dive, Scene, background, render_clip
from deepsports.errors import ConfigError, DataError
from deepsports.fileio import atomic_write

__all__ = ["REHEARSAL_VERSION", "BROADCAST_SIZE", "REHEARSAL_FPS", "MARGIN_FRAMES", "RehearsalReport",
           "rehearsal_dive", "generate_rehearsal"]

REHEARSAL_VERSION = 1
#: (height, width) of the whole videos: 16:9 broadcast footage at 360p.
BROADCAST_SIZE = (360, 640)
REHEARSAL_FPS = 30
#: Frames after the last annotated frame of a video (3 s), as a broadcast goes on after the last dive.
MARGIN_FRAMES = 90
#: Keyframe interval: 5 s, typical of web broadcast encodes; seeking to a clip decodes at most this many frames.
KEYINT = 150
STATUS_NAME = "rehearsal.json"
_FILES = ("final_annotations_dict.pkl", "train_split_0.pkl", "test_split_0.pkl")
_DIVES = [(half / 2, position) for half in range(2, 10) for position in (0, 1, 2)
          if half / 2 <= {0: 3.0, 1: 4.0, 2: 4.5}[position]]


def rehearsal_dive(annotation: ClipAnnotation, seed: int = 0) -> Dive:
    """The synthetic dive drawn for a real clip: nearest difficulty, qualities from the real execution."""
    dd = float(annotation.difficulty)
    somersaults, position = min(_DIVES, key=lambda d: (abs(difficulty(*d) - dd), d[0]))
    mark = float(annotation.final_score) / dd / 3 if dd > 0 else 0.0
    quality = min(1.0, max(0.0, (mark - 3.0) / 6.5))
    rng = np.random.default_rng([seed, annotation.video, annotation.clip])
    n_pre = int(rng.integers(4, 7))
    n_flight = 8 + int(3 * somersaults + 0.5)
    n_post = max(math.ceil(0.33 * (n_pre + n_flight)), 24 - n_pre - n_flight)
    rotation = int(annotation.extra.get("rotation_type", 0)) % 4
    return Dive(somersaults=somersaults, position=position, rotation_type=rotation, entry_quality=quality,
                form_quality=quality, tilt_sign=int(rng.choice([-1, 1])), n_pre=n_pre, n_flight=n_flight,
                n_post=n_post, noise_seed=int(rng.integers(0, 2**63 - 1)))


@dataclass(frozen=True)
class _VideoJob:
    video: int
    clips: tuple[ClipAnnotation, ...]  # sorted by start frame, non-overlapping
    num_frames: int
    size: tuple[int, int]
    seed: int
    path: str


@dataclass(frozen=True)
class RehearsalReport:
    """What a generation did: the dataset root, the videos written now and reused, frames and seconds."""

    root: Path
    written: tuple[int, ...]
    reused: tuple[int, ...]
    frames_written: int
    seconds: float

    @property
    def frames_per_s(self) -> float:
        return self.frames_written / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"rehearsal dataset {self.root}: {len(self.written)} video(s) written now, {len(self.reused)} already "
                f"there; {self.frames_written:,} frames in {self.seconds:.1f} s ({self.frames_per_s:,.0f} frames/s)")


def _x264_options() -> dict[str, str]:
    return {"preset": "ultrafast", "crf": "20", "threads": "1",
            "x264-params": f"keyint={KEYINT}:min-keyint={KEYINT}:scenecut=0"}


def _encode_gop(frames: Sequence[Any], size: tuple[int, int]) -> list[tuple[bytes, bool]]:
    """One closed GOP (a fresh encoder: starts with an IDR frame) as (payload, keyframe) per frame."""
    import av

    codec = av.CodecContext.create("libx264", "w")
    codec.height, codec.width = size
    codec.pix_fmt, codec.time_base, codec.framerate = "yuv420p", Fraction(1, REHEARSAL_FPS), Fraction(REHEARSAL_FPS)
    codec.options = _x264_options()
    codec.flags |= av.codec.context.Flags.global_header  # SPS/PPS in the MP4 header, as the stream's own encoder
    packets = []
    for index, frame in enumerate(frames):
        frame.pts = index
        packets += codec.encode(frame)
    packets += codec.encode(None)
    if len(packets) != len(frames):
        raise DataError(f"libx264 returned {len(packets)} packets for {len(frames)} frames")
    return [(bytes(packet), bool(packet.is_keyframe)) for packet in packets]


def _encode_video(job: _VideoJob) -> tuple[int, int, float]:
    """Write one whole video (temp name, then rename); returns (video, frames, seconds).

    The video is a sequence of closed GOPs on a fixed grid of :data:`KEYINT` frames, as a constant
    frame-rate broadcast encode: a GOP without dive frames reuses the packets of the filler GOP
    (encoded once), a GOP touching a dive is encoded afresh. Every GOP comes from an encoder with the
    same settings, so they share the stream's SPS/PPS; reading a clip decodes from the keyframe
    before it, as with real footage.
    """
    import av

    started = time.monotonic()
    height, width = job.size
    scene: Scene = sample_scene(np.random.default_rng([job.seed, job.video]), height, width)
    canvas = Canvas(background(scene))
    filler = av.VideoFrame.from_ndarray(canvas.bg_uint8, format="rgb24").reformat(format="yuv420p")
    filler_gop = _encode_gop([filler] * KEYINT, job.size)
    clips = list(job.clips)
    dive_frames: dict[int, list[Any]] = {}  # clip id -> its converted frames, while a GOP needs them

    def frame_at(index: int) -> Any:
        while clips and clips[0].end_frame - 1 < index:
            dive_frames.pop(clips.pop(0).clip, None)
        if not clips or index < clips[0].start_frame - 1:  # annotation frames are numbered from 1
            return filler
        clip = clips[0]
        if clip.clip not in dive_frames:
            rendered = render_clip(canvas, scene, rehearsal_dive(clip, job.seed), clip.start_frame - 1)
            dive_frames[clip.clip] = [av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
                                      for rgb in rendered]
        converted = dive_frames[clip.clip]
        # Stretch the dive over the real clip length (nearest frame).
        return converted[(index - clip.start_frame + 1) * len(converted) // clip.num_frames]

    def write(handle: Any) -> None:
        with av.open(handle, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=REHEARSAL_FPS, options=_x264_options())
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for first in range(0, job.num_frames, KEYINT):
                count = min(KEYINT, job.num_frames - first)
                touches_dive = clips and clips[0].start_frame - 1 < first + count
                gop = _encode_gop([frame_at(i) for i in range(first, first + count)], job.size) if touches_dive \
                    else filler_gop[:count]
                for offset, (payload, keyframe) in enumerate(gop):
                    packet = av.Packet(payload)
                    packet.stream, packet.time_base = stream, Fraction(1, REHEARSAL_FPS)
                    packet.pts = packet.dts = first + offset
                    packet.duration, packet.is_keyframe = 1, keyframe
                    container.mux(packet)

    try:
        atomic_write(job.path, write)  # a temp file beside it, renamed when complete
    except (av.FFmpegError, OSError) as exc:
        raise DataError(f"cannot write rehearsal video {job.path!r}: {exc}") from exc
    return job.video, job.num_frames, time.monotonic() - started


def _select(annotations: Mapping[tuple[int, int], ClipAnnotation], videos: Sequence[int] | None,
            clips_per_video: int | None) -> dict[int, list[ClipAnnotation]]:
    by_video: dict[int, list[ClipAnnotation]] = {}
    for clip in annotations.values():
        by_video.setdefault(clip.video, []).append(clip)
    if videos is not None:
        unknown = sorted(set(videos) - set(by_video))
        if unknown:
            raise ConfigError(f"rehearsal videos {unknown} are not in the annotations (videos there: "
                              f"{', '.join(f'{v:02d}' for v in sorted(by_video))})")
        by_video = {video: by_video[video] for video in videos}
    out = {}
    for video, clips in sorted(by_video.items()):
        clips = sorted(clips, key=lambda c: c.start_frame)
        for a, b in zip(clips, clips[1:]):
            if b.start_frame <= a.end_frame:
                raise DataError(f"video {video:02d}: clips {a.clip} and {b.clip} overlap ({a.start_frame}..{a.end_frame}"
                                f" and {b.start_frame}..{b.end_frame}); a whole video holds one dive at a time")
        out[video] = clips[:clips_per_video] if clips_per_video else clips
    return out


def _read_status(root: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        status = json.loads((root / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {"params": dict(params), "videos": {}}
    if not isinstance(status, dict) or status.get("params") != dict(params) or not isinstance(status.get("videos"), dict):
        return {"params": dict(params), "videos": {}}
    return status


def _write_json(path: Path, data: Any) -> None:
    text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(text))


def _write_files(root: Path, sources: Sequence[Path], subset: Mapping[int, list[ClipAnnotation]],
                 shortened: bool) -> None:
    """The real pickles byte for byte; a shortened subset writes its own (only the clips that exist)."""
    if not shortened:
        for source, name in zip(sources, _FILES):
            shutil.copyfile(source, root / name)
        return
    kept = {clip.key: clip for clips in subset.values() for clip in clips}
    save_annotations(kept, root / _FILES[0])
    for source, name in zip(sources[1:], _FILES[1:]):
        save_split([key for key in load_split(source) if key in kept], root / name)


def generate_rehearsal(out_dir: str | os.PathLike, *, annotation_path: str | os.PathLike | None = None,
                       train_path: str | os.PathLike | None = None, test_path: str | os.PathLike | None = None,
                       videos: Iterable[int] | None = None, clips_per_video: int | None = None,
                       size: tuple[int, int] = BROADCAST_SIZE, seed: int = 0, workers: int | None = None,
                       progress: Callable[[str], None] | None = None) -> RehearsalReport:
    """Write (or finish) the rehearsal dataset in ``out_dir``; see the module docstring.

    ``videos`` restricts it to some videos (all their clips; the real pickles stay unchanged, train
    with ``videos=...``); ``clips_per_video`` keeps each video's first clips only, shortening the video
    to them (the pickles then hold just those clips). ``workers`` processes encode videos in parallel
    (default: one per usable CPU). ``progress`` receives one line per finished video.
    """
    shipped = shipped_annotation_files()
    defaults = (shipped.annotations, shipped.train, shipped.test)
    sources = [Path(p if p is not None else d).expanduser() for p, d in
               zip((annotation_path, train_path, test_path), defaults)]
    for path in sources:
        if not path.is_file():
            raise DataError(f"MTL-AQA file {str(path)!r} does not exist (the annotation and split pickles ship in "
                            f"{defaults[0].parent})")
    height, width = (int(size[0]), int(size[1]))
    if height < 64 or width < height or height % 2 or width % 2:
        raise ConfigError(f"rehearsal size={size!r} is invalid: expected even (height, width) with 64 <= height <= width")
    if clips_per_video is not None and clips_per_video < 1:
        raise ConfigError(f"clips_per_video={clips_per_video!r} is invalid: expected an integer >= 1")
    subset = _select(load_annotations(sources[0]), sorted(int(v) for v in videos) if videos is not None else None,
                     clips_per_video)
    root = Path(out_dir).expanduser().absolute()
    (root / "whole_videos").mkdir(parents=True, exist_ok=True)
    params = {"version": REHEARSAL_VERSION, "size": [height, width], "fps": REHEARSAL_FPS, "seed": seed,
              "margin_frames": MARGIN_FRAMES, "keyint": KEYINT, "videos": sorted(subset),
              "clips_per_video": clips_per_video}
    status = _read_status(root, params)
    (root / MARKER).unlink(missing_ok=True)
    for stale in (root / "whole_videos").glob(".*.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    jobs, reused = [], []
    for video, clips in subset.items():
        path = root / "whole_videos" / f"{video:02d}.mp4"
        if f"{video:02d}" in status["videos"] and path.is_file():
            reused.append(video)
            continue
        jobs.append(_VideoJob(video, tuple(clips), clips[-1].end_frame + MARGIN_FRAMES, (height, width), seed, str(path)))
    started = time.monotonic()
    for video, frames, seconds in _run(jobs, workers):
        status["videos"][f"{video:02d}"] = {"frames": frames, "encode_s": round(seconds, 2)}
        _write_json(root / STATUS_NAME, status)
        if progress:
            progress(f"video {video:02d}: {frames:,} frames in {seconds:.1f} s ({frames / max(seconds, 1e-9):,.0f} frames/s)")
    elapsed = time.monotonic() - started
    _write_files(root, sources, subset, shortened=clips_per_video is not None)
    frames_written = sum(job.num_frames for job in jobs)
    _write_json(root / MARKER, {**params, "generator": "deepsports.data.rehearsal",
                                "total_frames": sum(v["frames"] for v in status["videos"].values()),
                                "clips": sum(len(c) for c in subset.values())})
    return RehearsalReport(root, tuple(job.video for job in jobs), tuple(reused), frames_written, elapsed)


def _run(jobs: list[_VideoJob], workers: int | None) -> Iterable[tuple[int, int, float]]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    workers = max(1, min(cpus if workers is None else workers, len(jobs)))
    longest_first = sorted(jobs, key=lambda job: -job.num_frames)
    if workers <= 1 or multiprocessing.current_process().daemon:
        yield from map(_encode_video, longest_first)
        return
    # fork: the workers run numpy and PyAV only (see deepsports.data.synth for why not spawn).
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for future in as_completed([pool.submit(_encode_video, job) for job in longest_first]):
            yield future.result()
