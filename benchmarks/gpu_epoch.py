"""One epoch of the original's best configuration on the full MTL-AQA rehearsal, on a GPU.

    python benchmarks/gpu_epoch.py --workdir DIR [--stages gen,prepare,train] [--json out.json]

The users' exact path, through the `deepsports` command: ``synth --rehearsal`` writes the 15 whole
videos at the real MTL-AQA frame ranges (from the shipped annotation and split pickles), ``prepare``
caches all 1,412 clips at the geometry ``experiments/seed_best.yaml`` reads (``data_aug`` crops 224 px
out of the 256 x 455 frames: the original's geometry, ~53 GB), and ``train`` runs one epoch of that
configuration (TimeSformer-B, 48 frames x 224 px, batch 8, AdamW + AMSGrad, ``data_aug``, 8 DataLoader
workers, bf16 autocast by ``precision: auto``) from scratch (no pretrained weights can be fetched
here; the arithmetic per step is the same). Reported: each stage's wall time and peak memory, the
epoch's clips/s and its ``data_wait_fraction`` (the share of the epoch the training waited for the
DataLoader: near 0 means the loader keeps up), the GPU's memory and utilisation sampled by
``nvidia-smi`` every 0.5 s, and the validation Spearman after the epoch.

Without CUDA, ``train`` says so and is skipped (gen and prepare run anywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("gen", "prepare", "train")


def deepsports(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepsports", *args]


def data_args(root: Path) -> list[str]:
    return [f"root_dir={root}", f"annotation_path={root / 'final_annotations_dict.pkl'}",
            f"train_path={root / 'train_split_0.pkl'}", f"test_path={root / 'test_split_0.pkl'}"]


def run_timed(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd`` (output to ``log``); wall seconds, exit code and the largest child's peak RSS."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - start
    tail = log.read_text(errors="replace")[-3000:]
    return {"cmd": " ".join(cmd[2:]), "returncode": code, "wall_s": round(wall, 1),
            "peak_rss_gib_largest_process": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
            "output_tail": tail}


def cli_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1",
               DEEPSPORTS_CACHE_DIR=str(work / "cache"), MLFLOW_TRACKING_URI=f"file://{work / 'mlruns'}",
               MLFLOW_ALLOW_FILE_STORE="true")
    return env


def stage_gen(work: Path, args: argparse.Namespace) -> dict:
    extra = ["--workers", str(args.workers)] if args.workers else []
    if args.quick:
        extra += ["--videos", "13", "14", "--clips-per-video", "4"]
    return run_timed(deepsports("synth", "--rehearsal", "--out", str(work / "rehearsal"), "--quiet", *extra),
                     cli_env(work), work / "gen.log")


def stage_prepare(work: Path, args: argparse.Namespace) -> dict:
    result = run_timed(deepsports("prepare", "--config", "seed_best", "--quiet", *data_args(work / "rehearsal"),
                                  *_quick(args)),
                       cli_env(work), work / "prepare.log")
    cache = work / "cache"
    files = [p for p in cache.rglob("*.npy")] if cache.exists() else []
    result.update(cache_files=len(files), cache_gb=round(sum(p.stat().st_size for p in files) / 1e9, 2))
    return result


def _quick(args: argparse.Namespace) -> list[str]:
    """--quick: the smoke test's shapes (tiny, 8 x 112) so that the path also runs on a CPU."""
    return ["backbone=tiny", "frame_num=8", "spatial_size=112", "num_workers=2", "batch_size=4",
            "train_val_split_ratio=0.5"] if args.quick else []


def _read_metrics(work: Path, run_id: str) -> dict:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # a file store: the GPU machine has mlflow-skinny, no SQLAlchemy
    from mlflow import MlflowClient

    client = MlflowClient(f"file://{work / 'mlruns'}")
    keys = ("clips_per_s", "epoch_seconds", "data_wait_fraction", "val_spearman", "train_loss")
    return {key: [m.value for m in client.get_metric_history(run_id, key)] for key in keys}


def stage_train(work: Path, args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available() and not args.quick:
        return {"skipped": "no CUDA device"}
    smi_path = work / "nvidia_smi.csv"
    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used",
                                "--format=csv,noheader,nounits", "-lms", "500"], stdout=smi_path.open("w"))
    overrides = ["pretrained_model=scratch", "epochs=1", "evaluate=false", "log_model=false",
                 "log_checkpoint=false", "resume=never", f"checkpoint_dir={work / 'checkpoints'}",
                 "run_name=gpu-epoch-seed-best", "experiment_name=gpu-fullscale"]
    try:
        result = run_timed(deepsports("train", "--config", "seed_best", *data_args(work / "rehearsal"), *overrides,
                                      *_quick(args)),
                           cli_env(work), work / "train.log")
    finally:
        if smi is not None:
            smi.terminate()
            smi.wait()
    tail = result["output_tail"]
    if result["returncode"] == 0 and "{" in tail:
        summary = json.loads(tail[tail.rindex("\n{") + 1:] if "\n{" in tail else tail[tail.index("{"):])
        result["summary"] = summary
        result["metrics"] = _read_metrics(work, summary["run_id"])
    if smi is not None:
        rows = [line.split(", ") for line in smi_path.read_text().splitlines() if line.count(",") == 2]
        util = [float(r[1]) for r in rows if r[1].strip().isdigit()]
        mem = [float(r[2]) for r in rows if r[2].strip().isdigit()]
        result["nvidia_smi"] = {"samples": len(rows), "gpu_util_mean_pct": sum(util) / max(1, len(util)),
                                "gpu_util_samples_ge_90_pct": sum(u >= 90 for u in util) / max(1, len(util)),
                                "memory_used_max_mib": max(mem, default=None)}
    result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the rehearsal, cache and runs go")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--workers", type=int, default=0, help="synth --rehearsal encoding processes [one per CPU]")
    parser.add_argument("--quick", action="store_true", help="smoke run: videos 13 and 14, 4 clips each, tiny 8 x 112")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after each stage)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; allowed: {', '.join(STAGES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.json or args.workdir / "gpu_epoch.json"
    report = json.loads(results_path.read_text()) if results_path.exists() else {}
    report["machine"] = {"nproc": os.cpu_count(), "loadavg_before": os.getloadavg()}
    for name in stages:
        print(f"== {name}", flush=True)
        report[name] = globals()[f"stage_{name}"](args.workdir, args)
        report[name]["loadavg_after"] = os.getloadavg()
        print(json.dumps({k: v for k, v in report[name].items() if k != "output_tail"}), flush=True)
        results_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
