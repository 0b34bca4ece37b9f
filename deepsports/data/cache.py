"""The on-disk clip cache: one uint8 ``.npy`` per clip plus a JSON manifest.

Layout: ``<cache_dir>/clips/<h>x<w>/<source-id>/`` holds ``VV_CCCC.npy`` files of shape (T, H, W, 3)
(RGB, T = end_frame - start_frame + 1) that training opens with ``np.load(mmap_mode="r")``, and
``manifest.json`` recording, per video, the source file's path, size and mtime_ns and, per clip, its frame
range, shape and file size. ``<source-id>`` names the dataset root (its directory name and a hash of its
absolute path), so two datasets never share clips.

Every file is written to a temporary name in the same directory (``.*.tmp``), flushed, fsynced and
renamed with :func:`os.replace`: a reader or a killed writer never sees half a clip, and a clip only
counts once the manifest lists it with the same range and file size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepsports.errors import DataError
from deepsports.fileio import atomic_write

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_TEMP_SUFFIX = ".tmp"
_LOCK_NAME = ".lock"

ClipKey = tuple[int, int]


def source_id(root_dir: str | os.PathLike) -> str:
    """``<dir name>-<12 hex of sha256(absolute path)>``: readable, and distinct for distinct roots."""
    root = Path(root_dir).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name) or "root"
    return f"{name}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def clip_cache_dir(cache_dir: str | os.PathLike, root_dir: str | os.PathLike, frame_size: tuple[int, int]) -> Path:
    """``<cache_dir>/clips/<h>x<w>/<source-id>``."""
    height, width = frame_size
    return Path(cache_dir).expanduser() / "clips" / f"{height}x{width}" / source_id(root_dir)


def video_key(video: int) -> str:
    return f"{video:02d}"


def clip_key(video: int, clip: int) -> str:
    """Manifest key and file stem of a clip: ``01_0007``."""
    return f"{video:02d}_{clip:04d}"


def clip_filename(video: int, clip: int) -> str:
    return clip_key(video, clip) + ".npy"


def is_temp_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIX)


def _atomic_write(path: Path, write: Any) -> None:
    # Temp names ".<name>.<pid>.<random>.tmp" (is_temp_file): prepare removes those of a killed writer.
    atomic_write(path, write, temp_prefix=f".{path.name}.{os.getpid()}.", temp_suffix=_TEMP_SUFFIX,
                 what=f"clip cache file {path.name}")


def write_clip(path: Path, frames: np.ndarray) -> int:
    """Atomically write ``frames`` uint8 (T, H, W, 3) as ``.npy``; returns the file size in bytes."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise DataError(f"clip {path.name}: expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    try:
        _atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(frames), allow_pickle=False))
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot write cached clip {str(path)!r}: {exc.strerror or exc}") from exc


def open_clip(path: Path) -> np.ndarray:
    """The cached clip as a read-only memory map, uint8 (T, H, W, 3)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cached clip {str(path)!r} cannot be read ({exc}); run `deepsports prepare` again") from exc


def empty_manifest(frame_size: tuple[int, int], root_dir: str | os.PathLike) -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "frame_size": list(frame_size),
            "root_dir": str(Path(root_dir).expanduser().resolve()), "videos": {}, "clips": {}}


def load_manifest(directory: Path, frame_size: tuple[int, int], root_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``directory``; an absent, unreadable or foreign one gives an empty manifest."""
    path = directory / MANIFEST_NAME
    fresh = empty_manifest(frame_size, root_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return fresh
    except (OSError, ValueError) as exc:
        log.warning("clip cache manifest %s is unreadable (%s); re-caching every clip", path, exc)
        return fresh
    if (not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION
            or data.get("frame_size") != list(frame_size) or not isinstance(data.get("videos"), dict)
            or not isinstance(data.get("clips"), dict)):
        log.warning("clip cache manifest %s has another format; re-caching every clip", path)
        return fresh
    data["root_dir"] = fresh["root_dir"]
    return data


def save_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _atomic_write(directory / MANIFEST_NAME, lambda handle: handle.write(text))


@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock of a cache directory, so concurrent prepares (parallel trials, array jobs) take turns.

    A POSIX record lock: released when its process dies and not inherited by forked workers, so the
    workers of a killed prepare cannot keep the next one waiting.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / _LOCK_NAME, "a+b") as handle:
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            log.info("waiting for another process preparing %s", directory)
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_UN)


def remove_temp_files(directory: Path) -> int:
    """Delete temp files left by a killed writer (call while holding :func:`cache_lock`)."""
    count = 0
    for path in directory.iterdir():
        if is_temp_file(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                count += 1
    return count


@dataclass(frozen=True)
class CachedClip:
    """Where one clip lives in the cache and which frames it holds."""

    path: Path
    start_frame: int
    end_frame: int
    shape: tuple[int, int, int, int]

    @property
    def num_frames(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class CacheIndex:
    """The clips a prepare made available, plus what it could not cache (``skip_bad``)."""

    directory: Path
    frame_size: tuple[int, int]
    clips: Mapping[ClipKey, CachedClip]
    bad_videos: Mapping[int, str] = field(default_factory=dict)
    bad_clips: Mapping[ClipKey, str] = field(default_factory=dict)
    num_written: int = 0
    num_reused: int = 0

    def __contains__(self, key: object) -> bool:
        return key in self.clips

    def __len__(self) -> int:
        return len(self.clips)

    def entry(self, key: ClipKey) -> CachedClip:
        try:
            return self.clips[key]
        except KeyError:
            raise DataError(f"clip {key!r} is not in the clip cache {str(self.directory)!r}"
                            + (f" (it was recorded as bad: {self.bad_clips[key]})" if key in self.bad_clips else "")) from None

    def open(self, key: ClipKey) -> np.ndarray:
        """The clip's frames, a read-only memory map uint8 (T, H, W, 3)."""
        return open_clip(self.entry(key).path)

    def summary(self) -> str:
        """A few lines for people: where the cache is, what was done, what is bad."""
        lines = [f"clip cache {self.directory} ({self.frame_size[0]}x{self.frame_size[1]} frames): {len(self.clips)} clips "
                 f"({self.num_written} written now, {self.num_reused} already cached)"]
        if self.bad_videos:
            lines.append(f"{len(self.bad_videos)} bad video(s):")
            lines += [f"  {video:02d}: {reason}" for video, reason in sorted(self.bad_videos.items())]
        if self.bad_clips:
            lines.append(f"{len(self.bad_clips)} bad clip(s) skipped:")
            lines += [f"  {key}: {reason}" for key, reason in sorted(self.bad_clips.items())]
        return "\n".join(lines)
