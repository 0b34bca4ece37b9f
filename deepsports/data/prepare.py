"""``deepsports prepare``: decode every annotated clip once into the uint8 clip cache.

Parallel over videos (each worker opens one video and decodes forward through its clips), resumable
(a clip counts once its file is renamed into place *and* the manifest lists it; a killed prepare loses
at most the clips of its last second), idempotent (a second run only stats files), and a video whose
size or mtime changed, or a clip whose annotated range changed, is cached again. Bad input (missing,
corrupt, or too short a video) raises :class:`DataError` naming video and clip, or with
``skip_bad=True`` is recorded in the manifest and the returned :class:`CacheIndex` and skipped.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue as queue_module
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from deepsports.data.cache import (
    CachedClip,
    CacheIndex,
    ClipKey,
    cache_lock,
    clip_cache_dir,
    clip_filename,
    clip_key,
    load_manifest,
    remove_temp_files,
    save_manifest,
    video_key,
    write_clip,
)
from deepsports.data.video import ClipRange, decode_clips
from deepsports.errors import DataError

log = logging.getLogger(__name__)

_SAVE_EVERY_S = 0.2  # at most this much finished work is lost to a kill
_LOG_EVERY_S = 10.0  # progress lines when there is no terminal
_POLL_S = 0.2

Message = tuple  # ("clip", video, clip, entry) | ("bad", video, clip, reason) | ("video_bad", video, reason) | ("done", video)


def video_path(root_dir: str | os.PathLike, video: int) -> Path:
    """``<root>/whole_videos/NN.mp4``, the original's layout."""
    return Path(root_dir).expanduser() / "whole_videos" / f"{video:02d}.mp4"


@dataclass(frozen=True)
class _VideoJob:
    video: int
    path: str
    clips: tuple[ClipRange, ...]
    frame_size: tuple[int, int]
    directory: str
    threads: int


def _run_job(job: _VideoJob, report: Callable[[Message], None], stop: Callable[[], bool]) -> None:
    """Decode and write ``job``'s clips, reporting each outcome; always ends with a "done" message."""
    results = decode_clips(job.path, job.clips, job.frame_size, threads=job.threads)
    try:
        while True:
            # Only decoding errors mean a bad video; an error raised by `report` must propagate.
            try:
                result = next(results, None)
            except DataError as exc:
                report(("video_bad", job.video, str(exc)))
                return
            if result is None:
                return
            clip = result.clip
            if result.error is not None:
                report(("bad", job.video, clip.clip, str(result.error)))
            else:
                path = Path(job.directory) / clip_filename(job.video, clip.clip)
                nbytes = write_clip(path, result.frames)
                report(("clip", job.video, clip.clip, {
                    "video": job.video, "clip": clip.clip, "start_frame": clip.start_frame, "end_frame": clip.end_frame,
                    "status": "ok", "file": path.name, "shape": list(result.frames.shape), "nbytes": nbytes}))
            if stop():
                return
    finally:
        results.close()
        report(("done", job.video))


# Worker-process state, set once by the pool initializer (a Queue cannot travel with each task).
_worker_queue: Any = None
_worker_stop: Any = None


def _init_worker(messages: Any, stop: Any) -> None:
    global _worker_queue, _worker_stop
    _worker_queue, _worker_stop = messages, stop


def _worker(job: _VideoJob) -> int:
    _run_job(job, _worker_queue.put, _worker_stop.is_set)
    return job.video


class _Session:
    """The parent's view of one prepare: manifest updates, bad records, progress, periodic saves."""

    def __init__(self, directory: Path, manifest: dict[str, Any], jobs: list[_VideoJob], skip_bad: bool,
                 progress: bool) -> None:
        self.directory, self.manifest, self.skip_bad = directory, manifest, skip_bad
        self.remaining = {job.video: {c.clip: c for c in job.clips} for job in jobs}
        self.written: dict[ClipKey, dict[str, Any]] = {}
        self.bad: dict[ClipKey, str] = {}
        self.total = sum(len(job.clips) for job in jobs)
        self.done_count = 0
        interactive = progress and sys.stderr.isatty()
        self.bar = tqdm(total=self.total, unit="clip", desc="caching clips", disable=not interactive, dynamic_ncols=True)
        self.log_lines = progress and not interactive
        self.started = self.last_save = self.last_log = time.monotonic()
        self.dirty = False  # the manifest has changes not yet on disk

    def handle(self, message: Message) -> None:
        kind, video = message[0], message[1]
        self.dirty = self.dirty or kind != "done"
        if kind == "clip":
            _, _, clip, entry = message
            self.remaining[video].pop(clip, None)
            self.manifest["clips"][clip_key(video, clip)] = entry
            self.written[(video, clip)] = entry
            self._advance()
        elif kind == "bad":
            _, _, clip, reason = message
            self._record_bad(video, self.remaining[video].pop(clip), reason)
        elif kind == "video_bad":
            reason = message[2]
            self.manifest["videos"].setdefault(video_key(video), {})["error"] = reason
            clips = sorted(self.remaining[video].values(), key=lambda c: c.clip)
            self.remaining[video].clear()
            for clip in clips:
                self._record_bad(video, clip, reason)
        elif kind == "done":
            self.save()
        now = time.monotonic()
        if now - self.last_save >= _SAVE_EVERY_S:
            self.save()
        if self.log_lines and now - self.last_log >= _LOG_EVERY_S:
            self.last_log = now
            rate = self.done_count / max(now - self.started, 1e-9)
            log.info("caching clips: %d/%d done (%.0f%%), %.1f clips/s", self.done_count, self.total,
                     100 * self.done_count / max(self.total, 1), rate)

    def _advance(self) -> None:
        self.done_count += 1
        self.bar.update(1)

    def _record_bad(self, video: int, clip: ClipRange, reason: str) -> None:
        self.manifest["clips"][clip_key(video, clip.clip)] = {
            "video": video, "clip": clip.clip, "start_frame": clip.start_frame, "end_frame": clip.end_frame,
            "status": "bad", "error": reason}
        self.bad[(video, clip.clip)] = reason
        self._advance()
        if not self.skip_bad:
            self.save()
            raise DataError(f"{reason} [video {video:02d}, clip {clip.clip}; use skip_bad / --skip-bad to record and go on]")
        log.warning("skipping video %02d clip %d: %s", video, clip.clip, reason)

    def save(self) -> None:
        if self.dirty:
            save_manifest(self.directory, self.manifest)
            self.dirty = False
        self.last_save = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def _run_inline(jobs: list[_VideoJob], session: _Session) -> None:
    for job in jobs:
        _run_job(job, session.handle, lambda: False)


def _run_parallel(jobs: list[_VideoJob], session: _Session, workers: int) -> None:
    # fork: workers need nothing but av + numpy and must not re-import the caller's __main__ (spawn
    # and forkserver do, which fails for a script read from stdin). They never touch torch or CUDA.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    messages, stop = context.Queue(), context.Event()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                   initargs=(messages, stop))
    futures: list[Future] = [executor.submit(_worker, job) for job in jobs]
    pending_videos = {job.video for job in jobs}
    try:
        while pending_videos:
            try:
                message = messages.get(timeout=_POLL_S)
            except queue_module.Empty:
                _raise_failure([future for future in futures if future.done()])
                continue
            if message[0] == "done":
                pending_videos.discard(message[1])
            session.handle(message)
        _raise_failure(futures)  # a job that failed still sent "done"
    finally:
        stop.set()
        executor.shutdown(wait=False, cancel_futures=True)
        # Drain what the workers still send, so their queue feeder threads can flush and the processes exit.
        while not all(future.done() for future in futures):
            try:
                messages.get(timeout=_POLL_S)
            except queue_module.Empty:
                pass
        executor.shutdown(wait=True)


def _raise_failure(futures: list[Future]) -> None:
    for future in futures:
        error = future.exception()
        if isinstance(error, DataError):
            raise error
        if error is not None:
            raise DataError(f"a prepare worker failed: {error!r}") from error


def _plan(root_dir: Path, annotations: Mapping[ClipKey, Any], keys: Iterable[ClipKey], directory: Path,
          manifest: dict[str, Any], skip_bad: bool
          ) -> tuple[dict[int, list[ClipRange]], dict[ClipKey, CachedClip], dict[int, str], dict[ClipKey, str]]:
    """Split ``keys`` into clips to decode (by video), clips already cached, and known-bad ones."""
    by_video: dict[int, list[ClipKey]] = {}
    for key in dict.fromkeys(keys):
        if key not in annotations:
            raise DataError(f"clip {key!r} is not in the annotations")
        by_video.setdefault(int(key[0]), []).append(key)
    todo: dict[int, list[ClipRange]] = {}
    reused: dict[ClipKey, CachedClip] = {}
    bad_videos: dict[int, str] = {}
    bad_clips: dict[ClipKey, str] = {}
    for video, video_keys in sorted(by_video.items()):
        path = video_path(root_dir, video)
        try:
            stat = path.stat()
        except OSError as exc:
            reason = f"video file {str(path)!r} does not exist or cannot be read ({exc.strerror})"
            if not skip_bad:
                raise DataError(f"{reason} [needed by clip {video_keys[0][1]} and {len(video_keys) - 1} more of video "
                                f"{video:02d}]") from exc
            log.warning("skipping video %02d (%d clips): %s", video, len(video_keys), reason)
            bad_videos[video] = reason
            bad_clips.update({key: reason for key in video_keys})
            continue
        source = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = manifest["videos"].get(video_key(video))
        changed = old is None or any(old.get(name) != value for name, value in source.items())
        if changed:
            stale = [k for k, entry in manifest["clips"].items() if entry.get("video") == video]
            for k in stale:
                del manifest["clips"][k]
            manifest["videos"][video_key(video)] = source
        for key in video_keys:
            annotation = annotations[key]
            clip = ClipRange(int(key[1]), int(annotation.start_frame), int(annotation.end_frame))
            entry = manifest["clips"].get(clip_key(video, clip.clip))
            same_range = (entry is not None and entry.get("start_frame") == clip.start_frame
                          and entry.get("end_frame") == clip.end_frame)
            if same_range and entry.get("status") == "ok":
                file = directory / entry["file"]
                try:
                    intact = file.stat().st_size == entry["nbytes"]
                except OSError:
                    intact = False
                if intact:
                    reused[key] = CachedClip(file, clip.start_frame, clip.end_frame, tuple(entry["shape"]))
                    continue
            if same_range and entry.get("status") == "bad":
                if not skip_bad:
                    raise DataError(f"{entry['error']} [video {video:02d}, clip {clip.clip}; recorded by an earlier "
                                    "prepare; use skip_bad / --skip-bad to go on]")
                bad_clips[key] = entry["error"]
                if "error" in manifest["videos"].get(video_key(video), {}):
                    bad_videos[video] = manifest["videos"][video_key(video)]["error"]
                continue
            todo.setdefault(video, []).append(clip)
    return todo, reused, bad_videos, bad_clips


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what SLURM/cgroups grant, not the whole node
    except AttributeError:
        return os.cpu_count() or 1


def prepare_cache(root_dir: str | os.PathLike, annotations: Mapping[ClipKey, Any], keys: Iterable[ClipKey],
                  cache_dir: str | os.PathLike, frame_size: tuple[int, int] = (128, 228), workers: int | None = None,
                  skip_bad: bool = False, progress: bool = True) -> CacheIndex:
    """Cache the clips ``keys`` (``(video, clip)``, looked up in ``annotations``) of ``<root_dir>/whole_videos``.

    Clips go to ``clip_cache_dir(cache_dir, root_dir, frame_size)`` as uint8 (T, H, W, 3) with
    (H, W) = ``frame_size``. ``workers`` processes decode videos in parallel (default: one per usable CPU;
    0 or 1 decodes in this process). Returns the :class:`CacheIndex` of every requested clip that is
    cached, plus the bad videos/clips that ``skip_bad=True`` recorded.
    """
    root_dir = Path(root_dir).expanduser()
    frame_size = (int(frame_size[0]), int(frame_size[1]))
    if min(frame_size) < 1:
        raise DataError(f"frame_size={frame_size!r} must be two positive integers (height, width)")
    directory = clip_cache_dir(cache_dir, root_dir, frame_size)
    started = time.monotonic()
    with cache_lock(directory):
        removed = remove_temp_files(directory)
        if removed:
            log.info("removed %d partial clip files left by an interrupted prepare in %s", removed, directory)
        manifest = load_manifest(directory, frame_size, root_dir)
        loaded = json.dumps(manifest, sort_keys=True)
        todo, reused, bad_videos, bad_clips = _plan(root_dir, annotations, keys, directory, manifest, skip_bad)
        if json.dumps(manifest, sort_keys=True) != loaded:  # a changed video drops its clips: record that first
            save_manifest(directory, manifest)
        cpus = _available_cpus()
        workers = min(cpus if workers is None else max(workers, 1), max(len(todo), 1))
        jobs = [_VideoJob(video, str(video_path(root_dir, video)), tuple(clips), frame_size, str(directory),
                          threads=max(1, cpus // workers))
                for video, clips in sorted(todo.items(), key=lambda item: -len(item[1]))]
        session = _Session(directory, manifest, jobs, skip_bad, progress)
        try:
            if workers <= 1 or len(jobs) <= 1:
                _run_inline(jobs, session)
            else:
                _run_parallel(jobs, session, workers)
        finally:
            session.save()
            session.close()
    clips = dict(reused)
    for key, entry in session.written.items():
        clips[key] = CachedClip(directory / entry["file"], entry["start_frame"], entry["end_frame"], tuple(entry["shape"]))
    bad_clips.update(session.bad)
    for video_entry_key, entry in manifest["videos"].items():
        if "error" in entry and any(key[0] == int(video_entry_key) for key in session.bad):
            bad_videos[int(video_entry_key)] = entry["error"]
    if todo or bad_clips:
        log.info("clip cache %s: %d clips written, %d reused, %d bad in %.1f s", directory, len(session.written),
                 len(reused), len(bad_clips), time.monotonic() - started)
    return CacheIndex(directory=directory, frame_size=frame_size, clips=clips, bad_videos=bad_videos,
                      bad_clips=bad_clips, num_written=len(session.written), num_reused=len(reused))


# --------------------------------------------------------------------------------------------
# From a Config: which files, which clips
# --------------------------------------------------------------------------------------------

#: File names of the MTL-AQA layout (also written by the synthetic generator).
ANNOTATION_FILE, TRAIN_SPLIT_FILE, TEST_SPLIT_FILE = "final_annotations_dict.pkl", "train_split_0.pkl", "test_split_0.pkl"


@dataclass(frozen=True)
class DataSource:
    """Where a configuration's videos, annotations and splits are."""

    dataset: str
    root: Path
    annotation_path: Path
    train_path: Path
    test_path: Path


@dataclass(frozen=True)
class Selection:
    """The annotations and the train/test keys a configuration uses (after the ``videos`` filter)."""

    source: DataSource
    annotations: Mapping[ClipKey, Any]
    train_keys: list[ClipKey]
    test_keys: list[ClipKey]


def resolve_source(config: Any, progress: bool = True) -> DataSource:
    """``dataset=synthetic``: the generated dataset under the cache dir (made on first use); ``mtl_aqa``: the paths
    (an empty annotation/split path is the MTL-AQA file shipped with the package)."""
    if config.dataset == "synthetic":
        from deepsports.data.synth import ensure_synthetic_dataset

        root = Path(ensure_synthetic_dataset(config.cache_path, config.synth_clips, config.synth_seed, progress=progress))
        return DataSource("synthetic", root, root / ANNOTATION_FILE, root / TRAIN_SPLIT_FILE, root / TEST_SPLIT_FILE)

    from deepsports.data.annotations import shipped_annotation_files

    shipped = shipped_annotation_files()

    def absolute(value: str, default: Path) -> Path:
        return Path(value).expanduser().resolve() if value else default

    return DataSource(config.dataset, Path(config.root_dir).expanduser().resolve(),
                      absolute(config.annotation_path, shipped.annotations), absolute(config.train_path, shipped.train),
                      absolute(config.test_path, shipped.test))


def select_clips(config: Any, progress: bool = True) -> Selection:
    """Load annotations and splits of ``config`` and apply its ``videos`` filter."""
    from deepsports.data.annotations import load_annotations, load_split

    source = resolve_source(config, progress)
    annotations = load_annotations(source.annotation_path)
    train_keys = load_split(source.train_path, annotations)
    test_keys = load_split(source.test_path, annotations)
    leaked = sorted(set(train_keys) & set(test_keys))
    if leaked:
        raise DataError(f"{len(leaked)} clip(s) are in both {str(source.train_path)!r} and {str(source.test_path)!r}, "
                        f"e.g. {leaked[:5]}: the test split must not overlap the train split")
    if config.videos != "all":
        wanted = {int(video) for video in config.videos}
        present = {key[0] for key in train_keys + test_keys}
        absent = sorted(wanted - present)
        if absent:
            raise DataError(f"videos={list(config.videos)!r}: video(s) {', '.join(f'{v:02d}' for v in absent)} have no "
                            f"clips in the train/test splits (videos with clips: "
                            f"{', '.join(f'{v:02d}' for v in sorted(present))})")
        train_keys = [key for key in train_keys if key[0] in wanted]
        test_keys = [key for key in test_keys if key[0] in wanted]
        for name, keys in (("train", train_keys), ("test", test_keys)):
            if not keys:
                raise DataError(f"videos={list(config.videos)!r} leaves the {name} split empty")
    return Selection(source, annotations, train_keys, test_keys)


def prepare_from_config(config: Any, progress: bool = True, skip_bad: bool = False,
                        workers: int | None = None) -> CacheIndex:
    """Cache every train and test clip ``config`` uses (``deepsports prepare``)."""
    selection = select_clips(config, progress)
    return prepare_cache(selection.source.root, selection.annotations, selection.train_keys + selection.test_keys,
                         config.cache_path, config.frame_size, workers=workers, skip_bad=skip_bad, progress=progress)
