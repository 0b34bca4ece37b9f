"""Trials per hour of one study run by a SLURM tuning array with 1 vs 2 tasks at once (the local cluster).

    python benchmarks/bench_slurm.py [--trials 8] [--epochs 3] [--trial-frames 8] [--trial-size 112] [--quick] [--keep DIR]

Both arrays have two tasks (``--array=0-1%1`` and ``--array=0-1%2``), each a ``deepsports tune``
worker of one journal-storage study with ``--max-trials``; trials are tiny (``TINY`` at 8 frames x
112 px, the demo's clip size, so that training rather than the fixed per-trial cost of run set-up,
checkpoints and logging dominates a trial), single-threaded (``cpus_per_task: 1`` exports
OMP_NUM_THREADS=1), on a synthetic set prepared beforehand. Two rates
are printed: over the trials' own span (first trial start to last trial end, from the study) and end
to end (``sbatch`` until the array left the queue, which adds worker start-up and scheduling). Needs
a running cluster (``deploy/slurm-local.sh start``); without ``sbatch`` it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = {"synth_clips": 40, "frame_num": 4, "spatial_size": 32, "patch_size": 16, "embed_dim": 32, "topology": "32",
        "dropout": "0.1", "batch_size": 4, "num_workers": 0, "warmup_epochs": 0, "log_model": "false",
        "evaluate": "false"}
SPACE = """params:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  activation: {type: categorical, choices: [none, relu, gelu]}
"""


def run_array(work: Path, cache: Path, concurrency: int, trials: int, settings: dict) -> dict:
    import optuna
    from optuna.trial import TrialState

    from deepsports.slurm.jobs import render_script, submit, worker_command
    from deepsports.slurm.profile import build_profile
    from deepsports.tune.study import open_storage

    work.mkdir(parents=True)
    (work / "space.yaml").write_text(SPACE)
    storage = str(work / "study.journal")
    profile = build_profile({"partition": "debug", "time": "30", "cpus_per_task": 1, "mem": "2G",
                             "logdir": str(work / "logs"),
                             "env": {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}},
                            "bench")
    sets = [a for k, v in {**settings, "cache_dir": str(cache)}.items() for a in ("--set", f"{k}={v}")]
    command = worker_command("tune", str(work / "space.yaml"), "--study", "bench", "--storage", storage,
                             "--max-trials", str(trials), "--pruner", "none", "--seed", "0", *sets,
                             python=sys.executable)
    script = render_script("tune", profile, command, job_name=f"bench-c{concurrency}", array_size=2,
                           array_concurrency=concurrency)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    job = submit(script, cwd=work)
    while subprocess.run(["squeue", "-h", "-r", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    end_to_end = time.monotonic() - started
    study = optuna.load_study(study_name="bench", storage=open_storage(storage))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(done) != trials:
        raise SystemExit(f"array with {concurrency} at once completed {len(done)} of {trials} trials; logs in "
                         f"{work / 'logs'}")
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    # Other processes on the node take CPUs from the tasks: the speed-up is only meaningful on a quiet machine.
    return {"concurrency": concurrency, "trials": trials, "span_s": span, "end_to_end_s": end_to_end,
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "trials_per_hour": trials / span * 3600, "trials_per_hour_end_to_end": trials / end_to_end * 3600}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trial-frames", type=int, default=8, help="frame_num of the trials")
    parser.add_argument("--trial-size", type=int, default=112, help="spatial_size of the trials")
    parser.add_argument("--quick", action="store_true", help="4 trials of 2 epochs at 4 x 32 px")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("sbatch") is None:
        print("bench_slurm: sbatch not found; start the local cluster (sudo deploy/slurm-local.sh start). Skipped.")
        return 0
    trials, epochs = (4, 2) if args.quick else (args.trials, args.epochs)
    frames, size = (4, 32) if args.quick else (args.trial_frames, args.trial_size)
    if min(trials, epochs, frames, size) < 1 or size % 16:
        parser.error(f"--trials {trials} --epochs {epochs} --trial-frames {frames} --trial-size {size}: expected "
                     f"positive numbers and a size that is a multiple of 16 (the patch size)")
    settings = {**TINY, "frame_num": frames, "spatial_size": size, "epochs": epochs}
    os.environ.pop("MLFLOW_RUN_ID", None)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    try:
        from deepsports.config import build_config
        from deepsports.data import build_datasets

        cache = root / "cache"
        build_datasets(build_config({**settings, "cache_dir": str(cache)}), progress=False)
        results = [run_array(root / f"c{c}", cache, c, trials, settings) for c in (1, 2)]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, nproc {os.cpu_count()}; "
          f"{trials} trials of {epochs} epochs, tiny model at {frames} x {size} px, one thread per task")
    print("| tasks at once | trials/hour (trial span) | span s | trials/hour (end to end) | end to end s | load avg |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['concurrency']} | {r['trials_per_hour']:.0f} | {r['span_s']:.1f} | "
              f"{r['trials_per_hour_end_to_end']:.0f} | {r['end_to_end_s']:.1f} | "
              f"{r['loadavg_1min'][0]:.1f} -> {r['loadavg_1min'][1]:.1f} |")
    one, two = results
    print(f"speed-up 2 vs 1 at once: {two['trials_per_hour'] / one['trials_per_hour']:.2f}x (trial span), "
          f"{two['trials_per_hour_end_to_end'] / one['trials_per_hour_end_to_end']:.2f}x (end to end)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
