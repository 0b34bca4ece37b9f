"""Prepare throughput: PyAV decoding (what ``deepsports prepare`` runs) vs the original's ffmpeg CLI to JPEGs.

    python benchmarks/bench_prepare.py [--clips 64] [--passes 3] [--source-size 640x360] [--quick] [--json out.json]

Setup (not timed): ``--clips`` synthetic dives (``deepsports.data.synth``), their whole videos
re-encoded at ``--source-size`` H.264 with ``bench_loader.py``'s ``upscale_videos``, so the videos
look like MTL-AQA broadcast footage. Then, over every whole video, one video after another, each
pass times (alternating, so a change in machine load hits all alike; medians of ``--passes``):

* **prepare, N workers**: ``deepsports.data.prepare_cache`` into a fresh cache at the default
  training size (128 x 228 frames for ``spatial_size`` 112) — exactly ``deepsports prepare``: decode
  each video once, seek over the gaps between clips, resize with swscale, write uint8 ``.npy`` clips.
  With 1 worker process and with one per CPU.
* **PyAV, whole video**: ``deepsports.data.video.VideoReader`` decoding every frame of every video
  and resizing it to 128 x 228 RGB, nothing written (the decode part of prepare, without seeking).
* **ffmpeg CLI to JPEG**: the original pipeline's frame extraction, ``ffmpeg -i NN.mp4 -qscale:v 2
  NN/%06d.jpg`` per video (the full-size JPEGs its loader then reads). ``ffmpeg`` from PATH, else the
  binary of the ``imageio-ffmpeg`` package (``pip install -e '.[bench]'``), else the column is skipped.
* **ffmpeg CLI, decode only** (``-f null -``): how much of the CLI's time is decoding.

Rates are source-video frames per second (every frame of the videos, the work needed before training
can start), plus clip frames written per second for prepare. Ratios are prepare or PyAV over ffmpeg
to JPEG, measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import av  # noqa: E402
from _common import finish, machine, median, positive_int, print_machine, usable_cpus  # noqa: E402
from bench_loader import upscale_videos  # noqa: E402

from deepsports.data import prepare_cache  # noqa: E402
from deepsports.data.annotations import load_annotations  # noqa: E402
from deepsports.data.dataset import intermediate_size  # noqa: E402
from deepsports.data.synth import generate_synthetic_dataset  # noqa: E402
from deepsports.data.video import VideoReader  # noqa: E402

CACHE_SIZE = intermediate_size(112)  # (height, width) of the cache for the default spatial_size


def find_ffmpeg() -> tuple[str | None, str]:
    """The ffmpeg executable and where it came from (None and the reason when there is none)."""
    found = shutil.which("ffmpeg")
    if found:
        return found, "PATH"
    try:
        import imageio_ffmpeg
    except ImportError:
        return None, "no ffmpeg on PATH and imageio-ffmpeg not installed (pip install -e '.[bench]')"
    try:
        return imageio_ffmpeg.get_ffmpeg_exe(), f"imageio-ffmpeg {imageio_ffmpeg.__version__}"
    except RuntimeError as exc:  # the package without a binary for this platform
        return None, f"imageio-ffmpeg has no ffmpeg binary here: {exc}"


def ffmpeg_version(exe: str) -> str:
    done = subprocess.run([exe, "-version"], capture_output=True, text=True)
    return done.stdout.split(" Copyright", 1)[0].strip() if done.returncode == 0 else "unknown"


def time_prepare(root: Path, annotations: dict, cache: Path, workers: int) -> tuple[float, int]:
    """Seconds of one prepare_cache into an empty cache, and the clip frames it wrote."""
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    index = prepare_cache(root, annotations, sorted(annotations), cache, CACHE_SIZE, workers=workers, progress=False)
    elapsed = time.perf_counter() - started
    if index.bad_clips or index.bad_videos or len(index.clips) != len(annotations):
        raise SystemExit(f"prepare_cache cached {len(index.clips)} of {len(annotations)} clips "
                         f"(bad: {index.bad_videos or index.bad_clips})")
    return elapsed, sum(entry.num_frames for entry in index.clips.values())


def time_pyav_whole(videos: list[Path]) -> tuple[float, int]:
    frames, started = 0, time.perf_counter()
    for video in videos:
        with VideoReader(video) as reader:
            for _, frame in reader.frames_from(0):
                reader.to_rgb(frame, CACHE_SIZE)
                frames += 1
    return time.perf_counter() - started, frames


def time_ffmpeg_jpeg(exe: str, videos: list[Path], out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    for video in videos:
        target = out / video.stem
        target.mkdir(parents=True)
        subprocess.run([exe, "-nostdin", "-loglevel", "error", "-i", str(video), "-qscale:v", "2",
                        str(target / "%06d.jpg")], check=True)
    elapsed = time.perf_counter() - started
    return elapsed, sum(1 for _ in out.glob("*/*.jpg"))


def time_ffmpeg_decode(exe: str, videos: list[Path]) -> tuple[float, None]:
    started = time.perf_counter()
    for video in videos:
        subprocess.run([exe, "-nostdin", "-loglevel", "error", "-i", str(video), "-f", "null", "-"], check=True)
    return time.perf_counter() - started, None  # writes nothing to count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=positive_int, default=64, help="synthetic clips")
    parser.add_argument("--passes", type=positive_int, default=3)
    parser.add_argument("--source-size", default="640x360", help="WIDTHxHEIGHT of the whole videos")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 clips, 1 pass")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.passes = 16, 1
    try:
        width, height = (int(v) for v in args.source_size.lower().split("x"))
    except ValueError:
        parser.error(f"--source-size {args.source_size!r}: expected WIDTHxHEIGHT, e.g. 640x360")

    exe, ffmpeg_source = find_ffmpeg()
    info = machine(pyav=av.__version__, ffmpeg=f"{ffmpeg_version(exe)} ({ffmpeg_source})" if exe else None)
    print_machine(info)
    if exe is None:
        print(f"ffmpeg columns skipped: {ffmpeg_source}")
    cpus = usable_cpus()
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    results: dict[str, Any] = {"machine": info, "source_size": [width, height], "cache_size_hw": list(CACHE_SIZE)}
    try:
        synth = generate_synthetic_dataset(work / "synth", n_clips=args.clips, seed=0, progress=False)
        root = work / "root"
        video_frames = upscale_videos(synth.root / "whole_videos", root / "whole_videos", width, height)
        videos = sorted((root / "whole_videos").glob("*.mp4"))
        annotations = load_annotations(synth.annotation_path)
        results.update(videos=len(videos), video_frames=video_frames, clips=len(annotations))
        print(f"data: {len(annotations)} clips in {len(videos)} whole videos, {video_frames} frames of "
              f"{width}x{height} H.264; cache frames {CACHE_SIZE[0]}x{CACHE_SIZE[1]}", flush=True)

        methods: dict[str, Callable[[], tuple[float, int | None]]] = {}
        for workers in sorted({1, cpus}):
            methods[f"prepare_{workers}w"] = (lambda w=workers: time_prepare(root, annotations, work / "cache", w))
        methods["pyav_whole"] = lambda: time_pyav_whole(videos)
        if exe is not None:
            methods["ffmpeg_jpeg"] = lambda: time_ffmpeg_jpeg(exe, videos, work / "jpeg")
            methods["ffmpeg_decode"] = lambda: time_ffmpeg_decode(exe, videos)
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        clip_frames = 0
        for _ in range(args.passes):
            for name, method in methods.items():
                elapsed, frames = method()
                seconds[name].append(elapsed)
                if name.startswith("prepare"):
                    clip_frames = frames
                elif name in ("pyav_whole", "ffmpeg_jpeg") and frames != video_frames:
                    raise SystemExit(f"{name} produced {frames} frames; the videos hold {video_frames}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    labels = {"pyav_whole": "PyAV VideoReader, every frame decoded + resized (nothing written)",
              "ffmpeg_jpeg": "ffmpeg CLI -qscale:v 2 to full-size JPEG (original)",
              "ffmpeg_decode": "ffmpeg CLI decode only (-f null)"}
    for workers in sorted({1, cpus}):
        labels[f"prepare_{workers}w"] = f"deepsports prepare (prepare_cache), {workers} worker process(es)"
    rates = {name: {"seconds_median": median(s), "seconds": s, "video_frames_per_s": video_frames / median(s)}
             for name, s in seconds.items()}
    for name in rates:
        if name.startswith("prepare"):
            rates[name]["clip_frames_per_s"] = clip_frames / rates[name]["seconds_median"]
    jpeg = rates.get("ffmpeg_jpeg")
    for rate in rates.values():
        rate["vs_ffmpeg_jpeg"] = rate["video_frames_per_s"] / jpeg["video_frames_per_s"] if jpeg else None
    results.update(clip_frames=clip_frames, passes=args.passes, methods=rates)

    print(f"\nmedian of {args.passes} alternating passes over {len(videos)} videos ({video_frames} frames, "
          f"{clip_frames} of them in clips):")
    print("| method | seconds | video frames/s | clip frames written/s | vs ffmpeg to JPEG |\n|---|---:|---:|---:|---:|")
    for name, rate in rates.items():
        clip_rate = f"{rate['clip_frames_per_s']:.0f}" if "clip_frames_per_s" in rate else "-"
        ratio = f"{rate['vs_ffmpeg_jpeg']:.2f}x" if rate["vs_ffmpeg_jpeg"] else "-"
        print(f"| {labels[name]} | {rate['seconds_median']:.2f} | {rate['video_frames_per_s']:.0f} | {clip_rate} | {ratio} |")
    if jpeg is None:
        print(f"| ffmpeg CLI to JPEG (original) | skipped: {ffmpeg_source} | | | |")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
