"""A synthetic diving dataset in exactly the MTL-AQA layout, with a visible generative rule.

No real diving video can be downloaded here, so tests and the demo train on these clips instead.
They go through the very same code paths as MTL-AQA: ``whole_videos/NN.mp4`` (real H.264 files
written with PyAV, mpeg4 where libx264 is missing), ``final_annotations_dict.pkl``,
``train_split_0.pkl`` and ``test_split_0.pkl`` (about 75/25), with the same fields as the real file.

Layout. Several whole videos (one per "event": board side, board height and colours are fixed per
video) hold the clips back to back, each clip 24-40 frames, with 4-12 empty frames between clips
like broadcast footage. ``start_frame..end_frame`` are inclusive frame numbers counted from 1, as
ffmpeg's ``%06d.jpg`` numbers them for the original and as :mod:`deepsports.data.video` reads them.
The frame just before a clip repeats its first frame and the frame just after repeats its last one,
so a reader off by one frame still sees the same dive.

Each clip: a diver (orange body of thick segments, yellow head) stands at the board tip, takes off,
somersaults in the air with motion blur and enters the blue water band at the bottom with a white
splash. The scores follow only from what is drawn:

Difficulty (degree of difficulty, DD) from the number of somersaults ``s`` (1 to 4.5 in half steps)
and the position (0 free/straight: one long straight line; 1 pike: legs folded straight at the hips,
a V; 2 tuck: knees to the chest, a ball)::

    DD = 1.0 + 0.6 * s + {tuck: 0.0, pike: 0.2, straight: 0.4}[position]      (exact in tenths)

Straight dives have at most 3 somersaults and pikes at most 4 (as in real diving), so DD lies in
[1.6, 3.7]. More somersaults are visible three ways: the body turns faster, so each flight frame
shows a wider motion-blur fan (sub-frame exposures); the diver flies higher (apex ``2.5 + 4 s``
units above the takeoff), longer (``8 + round(3 s)`` flight frames, about half of the clip) and so, at a
constant 2.4 units per frame, enters (and splashes) farther from the board; and a half somersault
left over means a head-first entry (arms overhead), whole somersaults a feet-first one.
``rotation_type`` (0 forward, 1 back, 2 reverse, 3 inward) only sets the turning direction and the
way the diver faces; it does not change the difficulty.

Execution from two hidden qualities drawn per dive from Beta(2.2, 1.4), both fully visible:

* entry quality ``qe``: splash plume width ``10 + 34 (1 - qe)`` and height ``6 + 36 (1 - qe)`` units,
  more droplets, and the body tilted up to 35 degrees off vertical at entry;
* form quality ``qf``: legs apart (splay ``22 (1 - qf)`` degrees each way), knees bent
  (``40 (1 - qf)`` degrees in straight/pike), flailing arms and a wobbling body in flight.

Each of 3 judges marks ``clip(round_to_half(3 + 6.5 (0.55 qe + 0.45 qf) + N(0, 0.35)), 0, 10)``;
``execution_sum`` is their sum (about 3 x [3, 9.5]) and ``final_score = execution_sum * DD`` rounded to
0.01 (a multiple of 0.05, like real scores); the judges' noise is the only noise. The other fields:
``ss_no = 2 s`` (half somersaults, as MTL-AQA counts them), ``tw_no = 0``, ``armstand = 0``,
``primary_view = 0``. Units are ``height / 128`` pixels. Everything is drawn from one seeded
``numpy.random.Generator``: the same seed gives the same files bit for bit (with the same numpy and
PyAV builds), whatever the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from deepsports.data.annotations import ClipAnnotation, save_annotations, save_split, video_filename
from deepsports.data.synth_render import Canvas, Dive, Scene, background, head_first, render_clip, render_empty
from deepsports.errors import ConfigError, DataError

__all__ = ["SynthDataset", "generate_synthetic_dataset", "ensure_synthetic_dataset", "synthetic_dataset_dir",
           "difficulty", "judge_marks", "SYNTH_VERSION", "DEFAULT_SIZE", "DEFAULT_FPS", "MARKER"]

log = logging.getLogger(__name__)

#: Bump when the rule or the drawing changes: cached datasets of another version are regenerated.
SYNTH_VERSION = 2
DEFAULT_SIZE = (128, 228)  # (height, width): 16:9, the cache size for 112-px model input
DEFAULT_FPS = 25
MARKER = ".complete"
POSITION_NAMES = {0: "free/straight", 1: "pike", 2: "tuck"}
_POSITION_BONUS_TENTHS = {0: 4, 1: 2, 2: 0}
_MAX_SOMERSAULTS = {0: 3.0, 1: 4.0, 2: 4.5}
_POSITION_WEIGHTS = {0: 0.25, 1: 0.40, 2: 0.35}
_HALF_SOMERSAULTS = np.arange(2, 10)  # 1 .. 4.5 somersaults
_HALF_SOMERSAULT_WEIGHTS = np.array([0.06, 0.10, 0.12, 0.15, 0.17, 0.17, 0.13, 0.10])
_NUM_JUDGES = 3
_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class SynthDataset:
    """Paths of a generated dataset (the MTL-AQA file names under ``root``)."""

    root: Path

    @property
    def annotation_path(self) -> Path:
        return self.root / "final_annotations_dict.pkl"

    @property
    def train_path(self) -> Path:
        return self.root / "train_split_0.pkl"

    @property
    def test_path(self) -> Path:
        return self.root / "test_split_0.pkl"

    @property
    def videos_dir(self) -> Path:
        return self.root / "whole_videos"

    @property
    def rules_path(self) -> Path:
        return self.root / "README.md"

    @property
    def details_path(self) -> Path:
        """Per-clip hidden causes (somersaults, qualities, judges' marks) as JSON, for checks and plots."""
        return self.root / "dives.json"


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------

def difficulty(somersaults: float, position: int) -> float:
    """DD = 1.0 + 0.6 s + position bonus, computed in tenths so it is exact."""
    half = round(2 * somersaults)
    if half != 2 * somersaults or not 2 <= half <= 9 or position not in _POSITION_BONUS_TENTHS:
        raise ConfigError(f"no synthetic dive with somersaults={somersaults!r}, position={position!r}: "
                          f"expected 1..4.5 in half steps and position 0, 1 or 2")
    return (10 + 3 * half + _POSITION_BONUS_TENTHS[position]) / 10


def judge_marks(entry_quality: float, form_quality: float, noise: np.ndarray) -> np.ndarray:
    """Marks of the judges (one per noise value) in half points, 0..10."""
    raw = 3.0 + 6.5 * (0.55 * entry_quality + 0.45 * form_quality) + 0.35 * noise
    return np.clip(np.round(raw * 2) / 2, 0.0, 10.0)


def _sample_dive(rng: np.random.Generator) -> tuple[Dive, np.ndarray]:
    half = int(rng.choice(_HALF_SOMERSAULTS, p=_HALF_SOMERSAULT_WEIGHTS))
    somersaults = half / 2
    allowed = [p for p in (0, 1, 2) if somersaults <= _MAX_SOMERSAULTS[p]]
    weights = np.array([_POSITION_WEIGHTS[p] for p in allowed])
    position = int(rng.choice(allowed, p=weights / weights.sum()))
    rotation_type = int(rng.integers(0, 4))
    entry_quality, form_quality = (float(q) for q in rng.beta(2.2, 1.4, size=2))
    tilt_sign = int(rng.choice([-1, 1]))
    n_pre = int(rng.integers(4, 7))
    n_flight = 8 + int(3 * somersaults + 0.5)
    # About a quarter of the clip after the entry, so evenly spaced samples always catch the splash.
    n_post = math.ceil(0.33 * (n_pre + n_flight)) + int(rng.integers(0, 2))
    n_post += max(0, 24 - (n_pre + n_flight + n_post))
    noise_seed = int(rng.integers(0, 2**63 - 1))
    marks = judge_marks(entry_quality, form_quality, rng.standard_normal(_NUM_JUDGES))
    dive = Dive(somersaults=somersaults, position=position, rotation_type=rotation_type, entry_quality=entry_quality,
                form_quality=form_quality, tilt_sign=tilt_sign, n_pre=n_pre, n_flight=n_flight, n_post=n_post,
                noise_seed=noise_seed)
    return dive, marks


def sample_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    u = height / 128
    board_y = float(rng.uniform(63, 66)) * u
    stands = []
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(0, width - 30), rng.uniform(2, 36) * u
        stands.append((float(x0), float(y0), float(x0 + rng.uniform(20, 60)), float(min(y0 + rng.uniform(8, 18) * u,
                       board_y - 4 * u)), float(rng.uniform(-10, 10))))
    return Scene(height=height, width=width, side=int(rng.choice([-1, 1])), board_y=board_y,
                 water_y=float(rng.uniform(107, 110)) * u, tint=tuple(float(t) for t in rng.uniform(-8, 8, 3)),
                 stands=tuple(stands), ripple_phase=float(rng.uniform(0, 2 * math.pi)))


@dataclass(frozen=True)
class _VideoPlan:
    video: int
    scene: Scene
    clips: tuple[tuple[int, int, Dive, np.ndarray], ...]  # (clip id, 0-based first frame, dive, judges' marks)
    num_frames: int


def _plan(n_clips: int, seed: int, height: int, width: int) -> tuple[list[_VideoPlan], list[tuple[int, int]],
                                                                        list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    n_videos = min(10, max(2, math.ceil(n_clips / 8)))
    scenes = [sample_scene(rng, height, width) for _ in range(n_videos)]
    plans = []
    for index, scene in enumerate(scenes):
        frame = int(rng.integers(3, 8))  # lead-in: the hold frame before the first clip exists
        clips = []
        for clip_id in range(1, n_clips // n_videos + (index < n_clips % n_videos) + 1):
            dive, marks = _sample_dive(rng)
            clips.append((clip_id, frame, dive, marks))
            frame += dive.num_frames + int(rng.integers(4, 13))
        plans.append(_VideoPlan(video=index + 1, scene=scene, clips=tuple(clips), num_frames=frame + 3))
    keys = [(plan.video, clip[0]) for plan in plans for clip in plan.clips]
    order = rng.permutation(len(keys))
    n_test = max(1, round(_TEST_FRACTION * len(keys)))
    test = [keys[i] for i in order[:n_test]]
    train = [keys[i] for i in order[n_test:]]
    return plans, train, test


#: Number of a video's first frame in the annotations (ffmpeg's ``%06d.jpg`` numbering).
FIRST_FRAME_NUMBER = 1


def _annotation(video: int, clip_id: int, first_index: int, dive: Dive, marks: np.ndarray) -> ClipAnnotation:
    dd = difficulty(dive.somersaults, dive.position)
    start = first_index + FIRST_FRAME_NUMBER
    return ClipAnnotation(video=video, clip=clip_id, start_frame=start, end_frame=start + dive.num_frames - 1,
                          difficulty=dd, final_score=round(float(marks.sum()) * dd, 2),
                          extra={"primary_view": 0, "position": dive.position, "armstand": 0,
                                 "rotation_type": dive.rotation_type, "ss_no": round(2 * dive.somersaults), "tw_no": 0})


def _details(plan: _VideoPlan, clip: tuple[int, int, Dive, np.ndarray], unit: float) -> dict[str, Any]:
    clip_id, first_index, dive, marks = clip
    width, height = dive.splash_size(unit)
    return {"video": plan.video, "clip": clip_id, "start_frame": first_index + FIRST_FRAME_NUMBER,
            "somersaults": dive.somersaults,
            "position": dive.position, "position_name": POSITION_NAMES[dive.position],
            "rotation_type": dive.rotation_type, "head_first": head_first(dive),
            "entry_quality": dive.entry_quality, "form_quality": dive.form_quality,
            "splash_width_px": width, "splash_height_px": height, "judges": [float(m) for m in marks],
            "execution_sum": float(marks.sum()), "difficulty": difficulty(dive.somersaults, dive.position),
            "n_pre": dive.n_pre, "n_flight": dive.n_flight, "n_post": dive.n_post, "board_side": plan.scene.side}


# --------------------------------------------------------------------------------------------
# Writing the videos
# --------------------------------------------------------------------------------------------

def _video_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _frames(plan: _VideoPlan) -> Iterator[np.ndarray]:
    canvas = Canvas(background(plan.scene))
    index = 0
    for _, start, dive, _ in plan.clips:
        clip = render_clip(canvas, plan.scene, dive, start)
        while index < start - 1:
            yield render_empty(canvas, plan.scene, index)
            index += 1
        yield from (clip[0], *clip, clip[-1])  # hold frames either side (see the module docstring)
        index += dive.num_frames + 2
    while index < plan.num_frames:
        yield render_empty(canvas, plan.scene, index)
        index += 1


def _write_video(plan: _VideoPlan, path: Path, fps: int, codec: str) -> int:
    """Encode one whole video; returns its number of clips. Single-threaded so the bytes never depend on threads."""
    import av

    try:
        with av.open(str(path), mode="w") as container:
            options = {"crf": "16", "preset": "ultrafast", "threads": "1"} if codec == "libx264" else {}
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = plan.scene.width, plan.scene.height, "yuv420p"
            stream.codec_context.gop_size = 2 * fps  # short GOPs keep seeking to a clip cheap
            stream.codec_context.thread_count = 1
            if codec != "libx264":
                stream.codec_context.bit_rate = 3_000_000  # mpeg4's default 200 kb/s would blur the diver
            written = 0
            for pts, rgb in enumerate(_frames(plan)):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = pts
                container.mux(stream.encode(frame))
                written += 1
            container.mux(stream.encode(None))
    except (av.FFmpegError, OSError) as exc:
        raise DataError(f"cannot write synthetic video {path}: {exc}") from exc
    if written != plan.num_frames:
        raise DataError(f"{path}: wrote {written} frames, planned {plan.num_frames}")
    return len(plan.clips)


def _default_workers(n_videos: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_videos))


def _write_videos(plans: list[_VideoPlan], videos_dir: Path, fps: int, codec: str, workers: int,
                  progress: bool) -> None:
    total = sum(len(plan.clips) for plan in plans)
    # A bar on a terminal only: in a log file (SLURM, CI, `2> log`) its carriage returns pile up in one line.
    interactive = progress and sys.stderr.isatty()
    if progress and not interactive:
        log.info("writing %d synthetic clips in %d videos to %s", total, len(plans), videos_dir)
    with tqdm(total=total, desc="synthetic dives", unit="clip", disable=not interactive) as bar:
        if workers <= 1 or multiprocessing.current_process().daemon:  # a daemon may not start processes
            for plan in plans:
                bar.update(_write_video(plan, videos_dir / video_filename(plan.video), fps, codec))
            return
        # fork, not forkserver/spawn: those re-import the caller's __main__, and a script without an
        # `if __name__ == "__main__"` guard would then wait forever on our lock. The workers only run
        # numpy and PyAV, so the caller's threads (torch, MLflow) hold no lock they could need.
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_write_video, plan, videos_dir / video_filename(plan.video), fps, codec)
                       for plan in sorted(plans, key=lambda p: -p.num_frames)]
            for future in as_completed(futures):
                bar.update(future.result())


# --------------------------------------------------------------------------------------------
# The dataset directory: atomic, idempotent, locked
# --------------------------------------------------------------------------------------------

def _params(n_clips: int, seed: int, height: int, width: int, fps: int) -> dict[str, Any]:
    return {"generator": "deepsports.data.synth", "version": SYNTH_VERSION, "n_clips": n_clips, "seed": seed,
            "height": height, "width": width, "fps": fps}


def _check_params(n_clips: Any, seed: Any, height: Any, width: Any, fps: Any) -> None:
    def bad(name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"synthetic dataset: {name}={value!r} is invalid: expected {expected}")

    for name, value, low in (("n_clips", n_clips, 4), ("seed", seed, 0), ("fps", fps, 1), ("height", height, 64)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise bad(name, value, f"an integer >= {low}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < height:
        raise bad("width", width, f"an integer >= height ({height})")
    for name, value in (("height", height), ("width", width)):
        if value % 2:
            raise bad(name, value, "an even number of pixels (yuv420p)")


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    marker = _read_marker(root)
    return marker is not None and all(marker.get(key) == value for key, value in params.items())


def _looks_generated(root: Path) -> bool:
    """Only ever replace a directory this module wrote (or an empty one), never a user's folder."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    names = {entry.name for entry in root.iterdir()}
    return not names or MARKER in names or names <= {"whole_videos", "final_annotations_dict.pkl", "train_split_0.pkl",
                                                     "test_split_0.pkl", "README.md", "dives.json"}


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock beside ``root``: two processes asking for the same dataset generate it once."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the atomic rename alone
        yield
        return
    with open(root.parent / f".{root.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rules_markdown(params: dict[str, Any], codec: str) -> str:
    rows = ["| somersaults | " + " | ".join(POSITION_NAMES[p] for p in (0, 1, 2)) + " |", "|---|---|---|---|"]
    for half in _HALF_SOMERSAULTS:
        s = half / 2
        cells = [f"{difficulty(s, p):.1f}" if s <= _MAX_SOMERSAULTS[p] else "-" for p in (0, 1, 2)]
        rows.append(f"| {s:g} | " + " | ".join(cells) + " |")
    doc = (__doc__ or "").strip()
    return (f"# Synthetic diving dataset (deepsports synth v{SYNTH_VERSION})\n\n"
            f"{params['n_clips']} clips, seed {params['seed']}, {params['width']}x{params['height']} at "
            f"{params['fps']} fps, codec {codec}. Generated by `deepsports.data.synth`; the hidden causes of each "
            f"clip's scores are in `dives.json`.\n\n## The generative rule\n\n{doc}\n\n"
            f"## Degree of difficulty by somersaults and position\n\n" + "\n".join(rows) + "\n")


def _write_dataset(root: Path, params: dict[str, Any], workers: int | None, progress: bool) -> None:
    plans, train, test = _plan(params["n_clips"], params["seed"], params["height"], params["width"])
    codec = _video_codec()
    videos_dir = root / "whole_videos"
    videos_dir.mkdir(parents=True)
    _write_videos(plans, videos_dir, params["fps"], codec,
                  _default_workers(len(plans)) if workers is None else workers, progress)
    annotations = {(plan.video, c[0]): _annotation(plan.video, *c) for plan in plans for c in plan.clips}
    save_annotations(annotations, root / "final_annotations_dict.pkl")
    save_split(train, root / "train_split_0.pkl")
    save_split(test, root / "test_split_0.pkl")
    unit = params["height"] / 128
    details = [_details(plan, clip, unit) for plan in plans for clip in plan.clips]
    (root / "dives.json").write_text(json.dumps({"version": SYNTH_VERSION, "clips": details}, indent=1) + "\n")
    (root / "README.md").write_text(_rules_markdown(params, codec))
    # The marker goes last: a directory without it is half-written and gets regenerated.
    (root / MARKER).write_text(json.dumps({**params, "codec": codec, "n_videos": len(plans),
                                           "n_train": len(train), "n_test": len(test)}, indent=1) + "\n")


def generate_synthetic_dataset(out_dir: str | os.PathLike, n_clips: int = 600, seed: int = 0, *,
                               width: int = DEFAULT_SIZE[1], height: int = DEFAULT_SIZE[0], fps: int = DEFAULT_FPS,
                               progress: bool = True, workers: int | None = None) -> SynthDataset:
    """Write the dataset into ``out_dir`` (see the module docstring) and return its paths.

    Idempotent: a complete dataset with the same parameters is returned as it is. Atomic: the files
    are written into a temporary directory beside ``out_dir`` that replaces it in one rename, so a
    killed run leaves either nothing or a directory without the ``.complete`` marker, which the next
    call regenerates. ``workers`` processes encode videos in parallel (default: one per CPU); the
    output does not depend on it.
    """
    _check_params(n_clips, seed, height, width, fps)
    root = Path(out_dir).expanduser().absolute()
    params = _params(int(n_clips), int(seed), int(height), int(width), int(fps))
    with _locked(root):
        if _is_complete(root, params):
            return SynthDataset(root)
        if not _looks_generated(root):
            raise DataError(f"refusing to replace {root}: it exists and is not a synthetic dataset "
                            f"(no {MARKER} marker); choose an empty or new directory")
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            _write_dataset(tmp, params, workers, progress)
            if root.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-old-", dir=root.parent))
                os.replace(root, old / root.name)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return SynthDataset(root)


def synthetic_dataset_dir(root_cache_dir: str | os.PathLike, n_clips: int, seed: int) -> Path:
    """``<cache>/synthetic/n{n_clips}_s{seed}``."""
    return Path(root_cache_dir).expanduser() / "synthetic" / f"n{n_clips}_s{seed}"


def ensure_synthetic_dataset(root_cache_dir: str | os.PathLike, n_clips: int, seed: int, *,
                             progress: bool = True) -> Path:
    """The dataset directory under the cache, generated on first use (a cheap marker check afterwards)."""
    _check_params(n_clips, seed, DEFAULT_SIZE[0], DEFAULT_SIZE[1], DEFAULT_FPS)
    root = synthetic_dataset_dir(root_cache_dir, n_clips, seed)
    if not _is_complete(root, _params(n_clips, seed, *DEFAULT_SIZE, DEFAULT_FPS)):
        generate_synthetic_dataset(root, n_clips, seed, progress=progress)
    return root
