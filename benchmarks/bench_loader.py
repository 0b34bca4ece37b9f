"""Clip loader throughput: the PyAV/mmap clip cache vs the original's JPEG-per-frame loader.

One run, the same clips for both:

1. Generate a synthetic dataset (``deepsports.data.synth``, ``--clips`` clips) and re-encode its whole
   videos at a broadcast-like source size (``--source-size``, default 640x360) so the original-style
   loader reads full-size JPEGs as it did on MTL-AQA.
2. (Prepare throughput, PyAV vs the ffmpeg CLI, is ``bench_prepare.py``'s.)
3. Extract every frame as ``<frames>/NN/%06d.jpg`` (the original's whole_videos_frames layout, numbered
   from 1; PyAV + PIL, not timed).
4. For each ``FRAMESxSIZE`` setting, with and without ``data_aug``: median clips/s over ``--passes``
   passes (alternating between the loaders) of a DataLoader (num_workers=0, batch 4, collation
   included: uint8 for the cache, whose clips are converted on the training device, float32 for the
   original) and of the datasets' items alone, for (a) ``ClipDataset`` on the cache and
   (b) the original-style dataset: per frame ``PIL.Image.open`` + ``to_tensor`` + resize to the
   intermediate 256-px-high 16:9 size (scaled to the spatial size) + normalise, then the clip resized
   to a square or randomly cropped and flipped; same frame method, frames and normalisation.

Torch runs single-threaded in both, as inside DataLoader workers. Prints a markdown table.
At 16 x 224 a batch of 4 float32 clips is 38 MB, and collating it into a freshly allocated tensor is
dominated by page faults; ``THP_MEM_ALLOC_ENABLE=1`` (read by torch at import) backs such tensors
with huge pages and speeds up both loaders' collation (see benchmarks/README.md).

    python benchmarks/bench_loader.py [--clips 64] [--passes 3] [--settings 8x112,16x224]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_model  # noqa: E402  (benchmarks/_common.py)

from deepsports.data import ClipDataset, prepare_cache, sample_indices  # noqa: E402
from deepsports.data.annotations import load_annotations  # noqa: E402
from deepsports.data.dataset import NORMALIZE_MEAN, NORMALIZE_STD, clip_target, intermediate_size  # noqa: E402
from deepsports.data.synth import generate_synthetic_dataset  # noqa: E402
from deepsports.train.video_input import VideoInput  # noqa: E402

FRAME_METHOD = "spaced_fixed"  # deterministic: both loaders read exactly the same frames


def upscale_videos(src: Path, dst: Path, width: int, height: int) -> int:
    """Re-encode every whole video at width x height (H.264); returns the number of frames."""
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for video in sorted(src.glob("*.mp4")):
        with av.open(str(video)) as source, av.open(str(dst / video.name), "w") as sink:
            in_stream = source.streams.video[0]
            out = sink.add_stream("libx264", rate=in_stream.average_rate, options={"crf": "18", "preset": "veryfast"})
            out.width, out.height, out.pix_fmt = width, height, "yuv420p"
            out.codec_context.gop_size = 2 * int(in_stream.average_rate)
            for index, frame in enumerate(source.decode(in_stream)):
                rgb = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
                big = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                big.pts = index
                sink.mux(out.encode(big))
                total += 1
            sink.mux(out.encode(None))
    return total


def extract_jpegs(videos: Path, frames_root: Path) -> int:
    """The original's ``ffmpeg -i NN.mp4 NN/%06d.jpg`` with PyAV + PIL (numbered from 1)."""
    count = 0
    for video in sorted(videos.glob("*.mp4")):
        out = frames_root / video.stem
        out.mkdir(parents=True, exist_ok=True)
        with av.open(str(video)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                frame.to_image().save(out / f"{index + 1:06d}.jpg", quality=90)
                count += 1
    return count


class OriginalStyleDataset(Dataset):
    """The original DeepSports loader's work per clip, reading whole_videos_frames/NN/%06d.jpg."""

    def __init__(self, frames_root: Path, clips: list, frame_num: int, spatial_size: int, normalize: bool,
                 data_aug: bool) -> None:
        self.frames_root, self.clips = frames_root, clips
        self.frame_num, self.spatial_size, self.normalize, self.data_aug = frame_num, spatial_size, normalize, data_aug
        self.size = intermediate_size(spatial_size)
        self.crop_flip = torch.nn.Sequential(T.RandomCrop(spatial_size), T.RandomHorizontalFlip())

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        rng = np.random.default_rng([0, 0, index])
        numbers = sample_indices(FRAME_METHOD, clip.num_frames, self.frame_num, clip.start_frame, rng)
        video = torch.empty(3, self.frame_num, *self.size)
        for t, number in enumerate(numbers):
            image = Image.open(self.frames_root / f"{clip.video:02d}" / f"{int(number):06d}.jpg")
            tensor = TF.resize(TF.to_tensor(image), list(self.size), antialias=True)
            if self.normalize:
                tensor = TF.normalize(tensor, NORMALIZE_MEAN, NORMALIZE_STD)
            video[:, t] = tensor
        if self.data_aug:
            video = self.crop_flip(video)
        else:
            video = TF.resize(video, [self.spatial_size, self.spatial_size], antialias=True)
        return {"video": video, "target": clip_target(clip.final_score, clip.difficulty)}


def one_pass(dataset: Dataset, batched: bool) -> float:
    """clips/s of one pass: through a DataLoader (batch 4, collation included) or item by item."""
    started = time.perf_counter()
    if batched:
        count = sum(batch["video"].shape[0] for batch in DataLoader(dataset, batch_size=4, num_workers=0))
    else:
        count = sum(1 for index in range(len(dataset)) if dataset[index]["video"] is not None)
    return count / (time.perf_counter() - started)


def compare(cached: Dataset, original: Dataset, passes: int, batched: bool) -> tuple[list[float], list[float]]:
    """Passes alternate between the two loaders, so a change in machine load hits both alike."""
    fast, slow = [], []
    for _ in range(passes):
        fast.append(one_pass(cached, batched))
        slow.append(one_pass(original, batched))
    return fast, slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--settings", default="8x112,16x224", help="FRAMESxSPATIAL_SIZE,...")
    parser.add_argument("--source-size", default="640x360", help="WIDTHxHEIGHT of the whole videos")
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temp dir, removed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    width, height = (int(v) for v in args.source_size.split("x"))
    try:
        print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average {os.getloadavg()[0]:.2f}, "
              f"torch {torch.__version__}, PyAV {av.__version__}, "
              f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}")
        synth = generate_synthetic_dataset(work / "synth", n_clips=args.clips, seed=0, progress=False)
        root = work / "root"
        num_frames = upscale_videos(synth.root / "whole_videos", root / "whole_videos", width, height)
        annotations = load_annotations(synth.annotation_path)
        clip_frames = sum(a.num_frames for a in annotations.values())
        print(f"data: {len(annotations)} clips ({clip_frames} frames) in {num_frames} frames of "
              f"{width}x{height} H.264 video")

        started = time.perf_counter()
        jpegs = extract_jpegs(root / "whole_videos", work / "whole_videos_frames")
        print(f"(untimed setup: {jpegs} JPEGs extracted with PyAV + PIL in {time.perf_counter() - started:.1f} s)")

        print("\n| frames x size, geometry | DataLoader: cached clips/s | DataLoader: original-style clips/s | speed-up "
              "| items only: cached clips/s | items only: original-style clips/s | speed-up |\n|---|---|---|---|---|---|---|")
        clips = [annotations[key] for key in sorted(annotations)]
        notes = []
        for setting in args.settings.split(","):
            frame_num, size = (int(v) for v in setting.split("x"))
            cache = prepare_cache(root, annotations, sorted(annotations), work / "cache", intermediate_size(size),
                                  progress=False)
            for data_aug in (False, True):
                cached = ClipDataset(clips, cache, frame_num=frame_num, frame_method=FRAME_METHOD, spatial_size=size,
                                     normalize=True, data_aug=data_aug, train=data_aug)
                original = OriginalStyleDataset(work / "whole_videos_frames", clips, frame_num, size, normalize=True,
                                                data_aug=data_aug)
                assert cached[0]["video"].shape == original[0]["video"].shape
                fast_runs, slow_runs = compare(cached, original, args.passes, batched=True)
                fast, slow = statistics.median(fast_runs), statistics.median(slow_runs)
                fast_items, slow_items = (statistics.median(runs)
                                          for runs in compare(cached, original, args.passes, batched=False))
                geometry = "random crop + flip" if data_aug else "resize to square"
                print(f"| {frame_num} x {size}, {geometry} | {fast:.1f} | {slow:.1f} | **{fast / slow:.1f}x** "
                      f"| {fast_items:.1f} | {slow_items:.1f} | {fast_items / slow_items:.1f}x |", flush=True)
                notes.append(f"{frame_num}x{size} {geometry} (DataLoader): cached {[round(r, 1) for r in fast_runs]}, "
                             f"original {[round(r, 1) for r in slow_runs]}")
                if not data_aug:
                    as_float = VideoInput(normalize=True)(cached[0]["video"][None])[0]  # as training sees it
                    difference = (as_float - original[0]["video"]).abs().mean()
                    notes[-1] += f"; clip 0 mean abs difference {difference:.3f} (normalised units)"
        print("\nclips/s of each pass: " + "\n  ".join(["", *notes]))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
