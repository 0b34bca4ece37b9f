"""PyAV decoding of whole videos into the clips the annotations name.

Frame numbers follow the original project. It extracted frames with ``ffmpeg -i NN.mp4 NN/%06d.jpg``,
whose numbering starts at 1, and read annotation frame ``f`` from ``f"{f:06d}.jpg"``; so annotation
frame ``f`` is the ``f``-th decoded frame (:data:`FIRST_FRAME_NUMBER` = 1), and a clip covers
``start_frame..end_frame`` inclusive.

A frame's number comes from its timestamp (``pts``) at the stream's average frame rate, counted from
the first decoded frame, never from a running counter: that keeps numbers exact after a seek. Like
ffmpeg's constant-frame-rate image output, a missing timestamp is filled with the previous frame and a
repeated one is dropped, so every number in a clip maps to exactly one frame.

Each video is opened once and decoded forward through all of its clips (sorted by start frame); a
clip that starts far ahead of the decoder is reached by seeking to the keyframe before it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from deepsports.errors import DataError

#: Number of the first frame of a video in annotations (ffmpeg's ``%06d.jpg`` starts at 1).
FIRST_FRAME_NUMBER = 1

#: Seek instead of decoding forward when the next clip starts more than this many seconds ahead.
_SEEK_GAP_SECONDS = 4.0

#: swscale filter of the resize; bilinear scales its support with the ratio, so downscaling is antialiased.
_INTERPOLATION = "BILINEAR"


@dataclass(frozen=True)
class ClipRange:
    """One annotated clip of a video: frames ``start_frame..end_frame`` inclusive (1-based)."""

    clip: int
    start_frame: int
    end_frame: int

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame + 1


@dataclass(frozen=True)
class ClipResult:
    """A decoded clip, ``frames`` uint8 (T, H, W, 3) RGB, or the error that kept it from being decoded."""

    clip: ClipRange
    frames: np.ndarray | None
    error: DataError | None


class VideoReader:
    """An open video file whose frames are addressed by 0-based index (frame number - 1)."""

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"video file {str(self.path)!r} does not exist")
        try:
            self._container = av.open(str(self.path), metadata_errors="replace")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise DataError(f"video file {str(self.path)!r} cannot be opened (corrupt or not a video): {exc}") from exc
        try:
            self._init_stream(threads)
        except BaseException:
            self._container.close()
            raise
        #: Frames seen so far at the end of the stream (set when decoding reached the end).
        self.frame_count: int | None = None
        # One reformatter keeps its swscale context: 5x faster than frame.to_ndarray(width=...) per frame.
        self._reformatter = VideoReformatter()

    def _init_stream(self, threads: int) -> None:
        if not self._container.streams.video:
            raise DataError(f"video file {str(self.path)!r} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self._stream.codec_context.thread_count = max(0, threads)
        rate = self._stream.average_rate or self._stream.guessed_rate
        if not rate or self._stream.time_base is None:
            raise DataError(f"video file {str(self.path)!r} has no frame rate or time base")
        self.fps = Fraction(rate)
        # Timestamp units per frame; frame index = (pts - first pts) / ticks_per_frame.
        self._ticks_per_frame = 1 / (Fraction(self._stream.time_base) * self.fps)
        first = next(self._decode(), None)
        if first is None or first.pts is None:
            raise DataError(f"video file {str(self.path)!r} holds no decodable frame with a timestamp")
        self._base_pts = first.pts

    def close(self) -> None:
        self._container.close()

    def to_rgb(self, frame: av.VideoFrame, frame_size: tuple[int, int]) -> np.ndarray:
        """``frame`` resized to ``frame_size`` = (height, width) as uint8 (H, W, 3) RGB."""
        height, width = frame_size
        return self._reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                          interpolation=_INTERPOLATION).to_ndarray()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _decode(self) -> Iterator[av.VideoFrame]:
        try:
            yield from self._container.decode(self._stream)
        except av.FFmpegError as exc:
            raise DataError(f"video file {str(self.path)!r} cannot be decoded (corrupt data): {exc}") from exc

    def _index_of(self, pts: int) -> int:
        return round((pts - self._base_pts) / self._ticks_per_frame)

    def _seek(self, index: int) -> None:
        # Half a frame early, so rounding of the container's timestamps cannot land after the frame.
        target = self._base_pts + math.floor((index - Fraction(1, 2)) * self._ticks_per_frame)
        try:
            self._container.seek(max(self._base_pts, target), stream=self._stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            raise DataError(f"video file {str(self.path)!r} cannot seek to frame {index + FIRST_FRAME_NUMBER}: {exc}") from exc

    def _indexed(self) -> Iterator[tuple[int, av.VideoFrame]]:
        """(index, frame) from the decoder's current position, with gaps filled and repeats dropped."""
        last: int | None = None
        previous = None
        for frame in self._decode():
            if frame.pts is None:
                if last is None:
                    continue  # no way to place it; the next timestamped frame sets the position
                index = last + 1
            else:
                index = self._index_of(frame.pts)
            if last is not None:
                if index <= last:
                    continue
                for missing in range(last + 1, index):
                    yield missing, previous
            yield index, frame
            last, previous = index, frame
        self.frame_count = None if last is None else last + 1

    def frames_from(self, index: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """Frames ``index, index + 1, ...`` (0-based, consecutive) until the end of the video."""
        backoff = 0
        seek_gap = max(1, int(self.fps * 2))
        while True:
            seek_index = max(0, index - backoff)
            self._seek(seek_index)
            frames = self._indexed()
            first = next(frames, None)
            if first is None:
                if seek_index == 0:
                    return
                backoff = max(2 * backoff, seek_gap)  # sought past the end: back up to learn the frame count
                continue
            if first[0] > index and seek_index > 0:
                # The keyframe the demuxer picked lies after the target (inexact index): seek further back.
                backoff = max(2 * backoff, seek_gap)
                continue
            break
        if first[0] >= index:
            yield first
        for item in frames:
            if item[0] >= index:
                yield item


def decode_clips(path: str | Path, clips: Sequence[ClipRange], frame_size: tuple[int, int], *,
                 threads: int = 0) -> Iterator[ClipResult]:
    """Decode ``clips`` of one video, each resized to ``frame_size`` = (height, width).

    Yields one :class:`ClipResult` per clip in order of start frame: ``frames`` uint8 (T, H, W, 3) with
    T = end_frame - start_frame + 1, or ``error`` naming video and clip (a range that is invalid or
    reaches past the end of the video). A file that is missing, cannot be opened or fails to decode
    raises :class:`DataError` naming the file and the clip being decoded.
    """
    path = Path(path)
    height, width = frame_size
    if height < 1 or width < 1:
        raise DataError(f"frame size {frame_size!r} must be positive (height, width)")
    valid: list[ClipRange] = []
    for clip in clips:
        if clip.start_frame < FIRST_FRAME_NUMBER or clip.end_frame < clip.start_frame:
            yield ClipResult(clip, None, DataError(
                f"clip {clip.clip} of {str(path)!r} has an invalid frame range {clip.start_frame}..{clip.end_frame} "
                f"(frames are numbered from {FIRST_FRAME_NUMBER} and end_frame must be >= start_frame)"))
        else:
            valid.append(clip)
    if not valid:
        return
    pending = deque(sorted(valid, key=lambda c: (c.start_frame, c.end_frame, c.clip)))
    try:
        reader = VideoReader(path, threads=threads)
    except DataError as exc:
        raise DataError(f"{exc} (needed by clip {pending[0].clip} and {len(pending) - 1} more)") from exc
    with reader:
        seek_gap = int(reader.fps * _SEEK_GAP_SECONDS)
        active: list[tuple[ClipRange, list[np.ndarray]]] = []
        frames: Iterator[tuple[int, av.VideoFrame]] | None = None
        position = 0  # index of the frame `frames` yields next
        while pending or active:
            if not active:
                target = pending[0].start_frame - FIRST_FRAME_NUMBER
                if frames is None or target < position or target - position > seek_gap:
                    frames = reader.frames_from(target)
                    position = target
            try:
                item = next(frames)
            except StopIteration:
                count = reader.frame_count
                have = f"only {count} frames" if count is not None else "fewer frames"
                for clip in [c for c, _ in active] + list(pending):
                    yield ClipResult(clip, None, DataError(
                        f"clip {clip.clip} needs frames {clip.start_frame}..{clip.end_frame} but video "
                        f"{str(path)!r} has {have} ({FIRST_FRAME_NUMBER}..{(count or 0) + FIRST_FRAME_NUMBER - 1})"))
                return
            except DataError as exc:
                clip = active[0][0] if active else pending[0]
                raise DataError(f"{exc} (while decoding clip {clip.clip}, frames "
                                f"{clip.start_frame}..{clip.end_frame})") from exc
            index, frame = item
            position = index + 1
            number = index + FIRST_FRAME_NUMBER
            while pending and pending[0].start_frame == number:
                active.append((pending.popleft(), []))
            if not active:
                continue
            rgb = reader.to_rgb(frame, (height, width))
            for _, buffer in active:
                buffer.append(rgb)
            for clip, buffer in active:
                if clip.end_frame == number:
                    yield ClipResult(clip, np.stack(buffer), None)
            active = [(clip, buffer) for clip, buffer in active if clip.end_frame != number]
