"""The real workload at full scale: the MTL-AQA rehearsal through prepare, the loader and training.

    python benchmarks/bench_fullscale.py --workdir DIR [--stages gen,prepare,...] [--quick] [--json out.json]

Stages (each appends its figures to ``DIR/results.json``, so a long run can be resumed stage by stage;
``--stages`` picks them and their order, by default all in this order):

* ``gen``: ``deepsports.data.rehearsal.generate_rehearsal`` into ``DIR/rehearsal`` (resumable; the
  figures of the run that wrote the videos are kept).
* ``prepare``: ``deepsports prepare`` (the CLI, default workers) over every train and test clip at the
  8 x 112 training geometry (cache_geometry=fit: 112 x 112): wall time, source-video frames/s (every
  frame of the 15 videos, the work the original did before training), clip frames/s, peak RSS of the
  process tree. Then, on ``--ffmpeg-videos`` (same run): prepare of just those videos vs the original's
  ``ffmpeg -i NN.mp4 %06d.jpg`` of the same videos (ratio; imageio-ffmpeg's binary).
* ``resume``: ``deepsports prepare`` at 16 x 224 (224 x 224), ``kill -9`` once half the clips are in
  the manifest, then run again: clips kept, rerun time, completeness.
* ``footprint``: the cache's bytes per geometry: measured (``du``) for the prepared ones, exact
  ``sum(128 + T*H*W*3)`` for all four (the .npy header is 128 bytes).
* ``loader``: ``--loader-clips`` train clips at 8 x 112, 16 x 224 and the original best configuration's
  48 x 224 (data_aug, 256 x 455 cache), DataLoader batch 4 with ``num_workers`` 0 and 2: the cached uint8
  loader vs the original-style JPEG + PIL loader (``bench_loader.OriginalStyleDataset`` on JPEGs of the
  same clips at source size), passes alternating; medians.
* ``epoch``: ``deepsports train`` (tiny preset) for one epoch over the train split (train_val_split_ratio
  0.99, no test) at 8 x 112 and 16 x 224: clips/s, epoch seconds, peak RSS.
* ``learn``: ``deepsports train`` (tiny) at 8 x 112 for ``--learn-epochs`` epochs with the default split and
  test evaluation: the test Spearman the rehearsal reaches.

``--quick`` runs every stage on a shortened subset (videos 13 and 14, three clips each; tiny loader and
training settings): the smoke test of ``tests/benchmarks/test_bench_fullscale.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, load_average, machine  # noqa: E402

STAGES = ("gen", "prepare", "resume", "footprint", "loader", "epoch", "learn")
GEOMETRIES = {"8x112 fit": (112, 112), "8x112 data_aug (128x228)": (128, 228), "16x224 fit": (224, 224),
              "original / 16x224 data_aug (256x455)": (256, 455)}
_POLL_S, _PSS_EVERY = 0.5, 10  # RSS every 0.5 s, PSS every 5 s
TINY = {"backbone": "tiny", "gpu": "false", "log_model": "false", "batch_size": "8", "loglevel": "WARNING"}


# --------------------------------------------------------------------------------------------
# Running the CLI with a peak-RSS watch over the whole process tree
# --------------------------------------------------------------------------------------------

def run_watched(cmd: list[str], env: dict[str, str], kill_when: Callable[[], bool] | None = None,
                timeout: float = 24 * 3600) -> dict[str, Any]:
    """Run ``cmd``; wall time and peak memory of the process tree (psutil: RSS every 0.5 s, PSS every 5 s).

    ``peak_pss_mb`` sums the proportional set size (shared pages split between the processes sharing
    them, e.g. torch's libraries in DataLoader workers); ``peak_rss_mb`` sums RSS (counts them in each).
    """
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak, peak_pss, killed, tree, polls = 0, 0, False, [root], 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
            if polls % _PSS_EVERY == 0:  # reading smaps costs real CPU on torch processes: not every poll
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:  # a child ended between listing and reading
            pass
        polls += 1
        if kill_when is not None and not killed and kill_when():
            proc.send_signal(signal.SIGKILL)
            for child in tree[1:]:
                child.kill()
            killed = True
        if time.monotonic() - started > timeout:
            proc.kill()
        time.sleep(_POLL_S)
    output = proc.stdout.read() if proc.stdout else ""
    return {"returncode": proc.returncode, "seconds": time.monotonic() - started, "peak_rss_mb": peak / 2**20,
            "peak_pss_mb": peak_pss / 2**20,
            "killed": killed, "output_tail": output[-2000:]}


def cli_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", DEEPSPORTS_CACHE_DIR=str(work / "cache"))
    return env


def data_args(root: Path) -> list[str]:
    return ["dataset=mtl_aqa", f"root_dir={root}", f"annotation_path={root / 'final_annotations_dict.pkl'}",
            f"train_path={root / 'train_split_0.pkl'}", f"test_path={root / 'test_split_0.pkl'}"]


def deepsports(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepsports.cli", *args]


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

def stage_gen(ctx: dict[str, Any]) -> dict[str, Any]:
    from deepsports.data.rehearsal import STATUS_NAME, generate_rehearsal

    subset = {"videos": [13, 14], "clips_per_video": 3} if ctx["quick"] else {}
    report = generate_rehearsal(ctx["root"], **ctx["pickles"], **subset, progress=print)
    status = json.loads((ctx["root"] / STATUS_NAME).read_text())["videos"]
    encode_s = sum(v["encode_s"] for v in status.values())
    frames = sum(v["frames"] for v in status.values())
    disk = sum(p.stat().st_size for p in (ctx["root"] / "whole_videos").glob("*.mp4"))
    return {"videos": len(status), "frames": frames, "encode_s_per_video_sum": round(encode_s, 1),
            "this_run": report.summary(), "video_bytes": disk, "subset": subset or "all 15 videos, all clips"}


def _video_frames(root: Path) -> int:
    import av

    total = 0
    for path in sorted((root / "whole_videos").glob("*.mp4")):
        with av.open(str(path)) as container:
            total += container.streams.video[0].frames
    return total


def _clip_frames(root: Path, videos: set[int] | None = None) -> int:
    from deepsports.data.annotations import load_annotations, load_split

    annotations = load_annotations(root / "final_annotations_dict.pkl")
    keys = load_split(root / "train_split_0.pkl") + load_split(root / "test_split_0.pkl")
    return sum(annotations[k].num_frames for k in keys if videos is None or k[0] in videos)


def _prepare(ctx: dict[str, Any], cache: Path, extra: list[str], kill_when=None) -> dict[str, Any]:
    env = {**cli_env(ctx["work"]), "DEEPSPORTS_CACHE_DIR": str(cache)}
    return run_watched(deepsports("prepare", "--quiet", *data_args(ctx["root"]), *extra), env, kill_when)


def stage_prepare(ctx: dict[str, Any]) -> dict[str, Any]:
    from bench_prepare import find_ffmpeg

    root, work = ctx["root"], ctx["work"]
    shutil.rmtree(work / "cache-112", ignore_errors=True)
    full = _prepare(ctx, work / "cache-112", ["spatial_size=112"])
    video_frames, clip_frames = _video_frames(root), _clip_frames(root)
    out = {"full": {**full, "video_frames": video_frames, "clip_frames": clip_frames,
                    "video_frames_per_s": video_frames / full["seconds"], "clip_frames_per_s": clip_frames / full["seconds"]}}
    ffmpeg, origin = find_ffmpeg()
    videos = ctx["ffmpeg_videos"]
    shutil.rmtree(work / "cache-sub", ignore_errors=True)
    sub = _prepare(ctx, work / "cache-sub", ["spatial_size=112", "videos=" + ",".join(f"{v:02d}" for v in videos)])
    jpeg_dir = work / "jpeg"
    started = time.monotonic()
    for video in videos:
        target = jpeg_dir / f"{video:02d}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(root / "whole_videos" / f"{video:02d}.mp4"),
                        str(target / "%06d.jpg")], check=True)
    ffmpeg_s = time.monotonic() - started
    jpeg_bytes = sum(p.stat().st_size for p in jpeg_dir.rglob("*.jpg"))
    shutil.rmtree(jpeg_dir, ignore_errors=True)
    out["subset"] = {"videos": videos, "ffmpeg": origin, "prepare_s": sub["seconds"], "ffmpeg_jpeg_s": ffmpeg_s,
                     "jpeg_bytes": jpeg_bytes, "ratio_prepare_vs_ffmpeg": ffmpeg_s / sub["seconds"],
                     "prepare_peak_rss_mb": sub["peak_rss_mb"], "prepare_peak_pss_mb": sub["peak_pss_mb"]}
    return out


def stage_resume(ctx: dict[str, Any]) -> dict[str, Any]:
    from deepsports.data.cache import MANIFEST_NAME

    cache = ctx["work"] / "cache-224"
    shutil.rmtree(cache, ignore_errors=True)
    total = len(_keys(ctx["root"]))

    def cached() -> int:
        manifests = list(cache.glob(f"clips/*/*/{MANIFEST_NAME}"))
        try:
            return len(json.loads(manifests[0].read_text())["clips"]) if manifests else 0
        except (OSError, ValueError):
            return 0

    first = _prepare(ctx, cache, ["spatial_size=224"], kill_when=lambda: cached() >= total // 2)
    kept = cached()
    second = _prepare(ctx, cache, ["spatial_size=224"])
    temp_left = [p.name for p in cache.rglob("*.tmp")]
    return {"clips": total, "killed": first["killed"], "killed_after_s": first["seconds"], "clips_kept": kept,
            "rerun_s": second["seconds"], "rerun_ok": second["returncode"] == 0, "clips_after": cached(),
            "temp_files_left": temp_left, "rerun_peak_pss_mb": second["peak_pss_mb"]}


def _keys(root: Path) -> list[tuple[int, int]]:
    from deepsports.data.annotations import load_split

    return load_split(root / "train_split_0.pkl") + load_split(root / "test_split_0.pkl")


def stage_footprint(ctx: dict[str, Any]) -> dict[str, Any]:
    frames = _clip_frames(ctx["root"])
    clips = len(_keys(ctx["root"]))
    out: dict[str, Any] = {"clips": clips, "clip_frames": frames, "geometries": {}}
    for name, (height, width) in GEOMETRIES.items():
        exact = 128 * clips + frames * height * width * 3
        entry = {"frame_size": f"{height}x{width}", "exact_gb": exact / 1e9}
        directory = next((ctx["work"] / d for d in ("cache-112", "cache-224")
                          if (ctx["work"] / d / "clips" / f"{height}x{width}").is_dir()), None)
        if directory is not None:
            du = subprocess.run(["du", "-sb", str(directory / "clips" / f"{height}x{width}")], capture_output=True,
                                text=True, check=True)
            entry["measured_gb"] = int(du.stdout.split()[0]) / 1e9
        out["geometries"][name] = entry
    return out


def stage_loader(ctx: dict[str, Any]) -> dict[str, Any]:
    from _fullscale_loader import loader_table

    return loader_table(ctx)


def _train(ctx: dict[str, Any], name: str, extra: dict[str, str]) -> dict[str, Any]:
    import mlflow

    env = cli_env(ctx["work"])
    env["DEEPSPORTS_CACHE_DIR"] = str(ctx["work"] / extra.pop("_cache"))
    values = {**TINY, "experiment_name": "fullscale", "run_name": name,
              "checkpoint_dir": str(ctx["work"] / "checkpoints" / name), "resume": "never", **extra}
    result = run_watched(deepsports("train", *data_args(ctx["root"]), *[f"{k}={v}" for k, v in values.items()]), env)
    if result["returncode"] != 0:
        raise RuntimeError(f"deepsports train ({name}) exited {result['returncode']}:\n{result['output_tail']}")
    summary = json.loads(result["output_tail"][result["output_tail"].index("{"):])
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    history = {key: [m.value for m in client.get_metric_history(summary["run_id"], key)]
               for key in ("clips_per_s", "epoch_seconds", "val_spearman")}
    return {**{k: v for k, v in result.items() if k != "output_tail"}, "summary": summary, "history": history}


def stage_epoch(ctx: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for frames, size, cache in ctx["epoch_settings"]:
        name = f"{frames}x{size}" + ("" if ctx["epoch_videos"] == "all" else f" videos {ctx['epoch_videos']}")
        out[name] = _train(ctx, f"epoch-{frames}x{size}", {
            "_cache": cache, "frame_num": str(frames), "spatial_size": str(size), "epochs": "1", "warmup_epochs": "0",
            "train_val_split_ratio": "0.99", "evaluate": "false", "videos": ctx["epoch_videos"]})
    return out


def stage_learn(ctx: dict[str, Any]) -> dict[str, Any]:
    epochs = ctx["learn_epochs"]
    frames, size, cache = (4, 32, "cache-112") if ctx["quick"] else (8, 112, "cache-112")
    return {"epochs": epochs, **_train(ctx, f"learn-{frames}x{size}-{epochs}ep", {
        "_cache": cache, "frame_num": str(frames), "spatial_size": str(size), "epochs": str(epochs),
        "warmup_epochs": "1" if epochs > 1 else "0"})}


# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where the data, caches and results.json live [a temp dir]")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--quick", action="store_true", help="a shortened subset: the CI smoke run")
    parser.add_argument("--mtl-aqa-dir", default=None, help="folder of the real pickles [the packaged ones]")
    parser.add_argument("--ffmpeg-videos", default="13", help="videos for the ffmpeg-to-JPEG comparison [13]")
    parser.add_argument("--loader-clips", type=int, default=48)
    parser.add_argument("--learn-epochs", type=int, default=4)
    parser.add_argument("--epoch-settings", default="8x112,16x224", help="FRAMESxSIZE of the epoch stage")
    parser.add_argument("--epoch-videos", default="all", help="videos the epoch stage trains on, e.g. 13,14 [all]")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown)}; allowed: {', '.join(STAGES)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_fullscale_")).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    from deepsports.data.annotations import shipped_annotation_files

    shipped = shipped_annotation_files()
    files = (shipped.annotations, shipped.train, shipped.test)
    if args.mtl_aqa_dir is not None:
        files = tuple(Path(args.mtl_aqa_dir) / p.name for p in files)
    ctx = {"work": work, "root": work / "rehearsal", "quick": args.quick,
           "pickles": dict(zip(("annotation_path", "train_path", "test_path"), files)),
           "ffmpeg_videos": [14] if args.quick else [int(v) for v in args.ffmpeg_videos.split(",")],
           "loader_clips": 4 if args.quick else args.loader_clips, "loader_passes": 1 if args.quick else 3,
           "loader_settings": [(4, 32, False), (4, 32, True)] if args.quick else
           [(8, 112, False), (16, 224, False), (48, 224, True)],
           "epoch_settings": [(4, 32, "cache-112")] if args.quick else [
               (int(f), int(z), "cache-112" if int(z) == 112 else "cache-224")
               for f, z in (setting.split("x") for setting in args.epoch_settings.split(","))],
           "learn_epochs": 1 if args.quick else args.learn_epochs, "epoch_videos": args.epoch_videos}
    if args.quick:
        TINY.update(batch_size="2", embed_dim="32", topology="32", dropout="0.1")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    functions = {name: globals()[f"stage_{name}"] for name in STAGES}
    for name in stages:
        info = machine(date=time.strftime("%Y-%m-%d %H:%M"))
        print(f"== {name} (load average {info['loadavg_before']})", flush=True)
        figures = functions[name](ctx)
        if name == "epoch" and name in results:  # settings measured in separate runs add up
            figures = {**results[name]["figures"], **figures}
        results[name] = {"figures": figures, "machine": {**info, "loadavg_after": load_average()}}
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(json.dumps(figures, indent=1, default=str)[:3000], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
