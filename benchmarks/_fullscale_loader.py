"""The ``loader`` stage of ``bench_fullscale.py``: the cached uint8 loader vs the original-style JPEG loader.

Not a benchmark itself (``run_all.py`` runs ``bench_*.py`` only). The same ``loader_clips`` train clips
of the rehearsal for both loaders; the original-style one reads JPEGs of those clips' frames at the
source size (decoded with PyAV, written with PIL: untimed setup, as the original's extraction).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from _common import median
from bench_loader import FRAME_METHOD, OriginalStyleDataset
from torch.utils.data import DataLoader


def _jpegs(root: Path, clips: list, out: Path) -> None:
    from PIL import Image

    from deepsports.data.rehearsal import BROADCAST_SIZE
    from deepsports.data.video import ClipRange, decode_clips

    by_video: dict[int, list] = {}
    for clip in clips:
        by_video.setdefault(clip.video, []).append(ClipRange(clip.clip, clip.start_frame, clip.end_frame))
    for video, ranges in by_video.items():
        folder = out / f"{video:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for result in decode_clips(root / "whole_videos" / f"{video:02d}.mp4", ranges, BROADCAST_SIZE):
            for offset, frame in enumerate(result.frames):
                path = folder / f"{result.clip.start_frame + offset:06d}.jpg"
                if not path.exists():
                    Image.fromarray(frame).save(path, quality=90)


def _clips_per_s(dataset, num_workers: int, convert: bool) -> float:
    from deepsports.train.video_input import VideoInput

    video_input = VideoInput(getattr(dataset, "normalize", True)) if convert else None
    loader = DataLoader(dataset, batch_size=4, num_workers=num_workers)
    started = time.perf_counter()
    count = 0
    for batch in loader:
        video = video_input(batch["video"]) if video_input is not None else batch["video"]
        count += video.shape[0]
    return count / (time.perf_counter() - started)


def loader_table(ctx: dict[str, Any]) -> dict[str, Any]:
    from deepsports.data import ClipDataset, prepare_cache
    from deepsports.data.annotations import load_annotations, load_split
    from deepsports.data.dataset import intermediate_size

    root, work = ctx["root"], ctx["work"]
    annotations = load_annotations(root / "final_annotations_dict.pkl")
    train = load_split(root / "train_split_0.pkl")
    step = max(1, len(train) // ctx["loader_clips"])
    clips = [annotations[key] for key in sorted(train)[::step][:ctx["loader_clips"]]]
    started = time.monotonic()
    _jpegs(root, clips, work / "loader-jpeg")
    out: dict[str, Any] = {"clips": len(clips), "jpeg_setup_s": time.monotonic() - started, "rows": []}
    torch.set_num_threads(1)  # as inside DataLoader workers; the 0-worker rows then compare like with like
    for frame_num, size, data_aug in ctx["loader_settings"]:
        frame_size = intermediate_size(size) if data_aug else (size, size)
        cache = prepare_cache(root, annotations, [c.key for c in clips], work / "cache-loader", frame_size,
                              progress=False)
        cached = ClipDataset(clips, cache, frame_num=frame_num, frame_method=FRAME_METHOD, spatial_size=size,
                             normalize=True, data_aug=data_aug, train=data_aug)
        original = OriginalStyleDataset(work / "loader-jpeg", clips, frame_num, size, normalize=True, data_aug=data_aug)
        for num_workers in (0, 2):
            runs: dict[str, list[float]] = {"cached_uint8": [], "cached_plus_cpu_conversion": [], "original": []}
            for _ in range(ctx["loader_passes"]):  # alternating, so a change in load hits all alike
                runs["cached_uint8"].append(_clips_per_s(cached, num_workers, convert=False))
                runs["cached_plus_cpu_conversion"].append(_clips_per_s(cached, num_workers, convert=True))
                runs["original"].append(_clips_per_s(original, num_workers, convert=False))
            row = {"setting": f"{frame_num}x{size}" + (" data_aug" if data_aug else ""),
                   "cache": f"{frame_size[0]}x{frame_size[1]}",
                   "num_workers": num_workers, **{k: median(v) for k, v in runs.items()}, "passes": runs}
            row["ratio"] = row["cached_uint8"] / row["original"]
            row["ratio_with_cpu_conversion"] = row["cached_plus_cpu_conversion"] / row["original"]
            out["rows"].append(row)
            print(f"  {row['setting']} workers={num_workers}: cached {row['cached_uint8']:.1f} clips/s "
                  f"(+CPU conversion {row['cached_plus_cpu_conversion']:.1f}), original {row['original']:.1f}: "
                  f"{row['ratio']:.1f}x", flush=True)
    return out
