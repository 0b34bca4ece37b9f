"""How training cost scales: clips/s of the tiny preset over frames x size, and study trials/hour with 1 vs 2 workers.

    python benchmarks/bench_scaling.py [--frames 8,16] [--sizes 112,160,224] [--rounds 3] [--trials 6]
                                       [--skip-model | --skip-study] [--quick] [--json out.json]

(a) **Model**: one training step (forward + backward, MSE on the 2 outputs; ``bench_model.py``'s step)
of the ``tiny`` preset on a synthetic batch, no data loading, for every ``frame_num`` x ``spatial_size``.
Rounds run every setting once, interleaved, after one warm-up step each; the table gives the median
clips/s, its ratio to the first setting (measured in the same run), the FLOPs of one clip (counted
with the explicit attention path, as in ``bench_model.py``) and the FLOP/s achieved. With ``--json``
a plot is written next to the JSON file (same name, ``.png``).

(b) **Study**: ``deepsports tune --workers N`` (the CLI, a subprocess) on the same tiny study with
N = 1 and then 2: a journal-storage study of ``--trials`` trials (``--max-trials``, pruner none), tiny
single-threaded trials (``OMP_NUM_THREADS=1``; ``bench_slurm.py``'s settings — 40 synthetic clips,
embed 32, no evaluation — at ``--trial-frames`` x ``--trial-size`` px, 8 x 112 by default, so that
training rather than the fixed per-trial cost of run set-up, checkpoints and logging, about 1 s,
dominates a trial) on a cache prepared beforehand. Trials/hour are given over the trials' own span
(first trial start to last trial end, from the study) and end to end (the command's wall time, which
adds process start-up: the launcher, then the workers importing torch and MLflow). The CPU seconds
the command used per wall second show how many cores the workers got. Target: 2 workers >= 1.8x one
worker on 2 idle cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import REPO, finish, load_average, machine, positive_int, print_machine  # noqa: E402
from bench_model import _model, _train_step, count_step_flops  # noqa: E402
from bench_slurm import SPACE, TINY  # noqa: E402


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers >= 1")
    return values


# --- (a) model throughput over frames x size ---

def bench_model_grid(frames: list[int], sizes: list[int], batch: int, rounds: int) -> list[dict[str, Any]]:
    device = torch.device("cpu")
    settings = [(t, s) for t in frames for s in sizes]
    cases = {}
    for t, s in settings:
        model = _model(device, backbone="tiny", frame_num=t, spatial_size=s)
        video, target = torch.rand(batch, 3, t, s, s), torch.rand(batch, 2)
        _train_step(model, video, target, None)  # warm-up: kernel choice, allocations
        cases[(t, s)] = (model, video, target)
    seconds: dict[tuple[int, int], list[float]] = {key: [] for key in settings}
    for _ in range(rounds):  # interleaved, so a change in machine load hits every setting alike
        for key, (model, video, target) in cases.items():
            start = time.perf_counter()
            _train_step(model, video, target, None)
            seconds[key].append(time.perf_counter() - start)
    rows = []
    for t, s in settings:
        model, video, target = cases[(t, s)]
        flops = count_step_flops(model, video, target)
        step = statistics.median(seconds[(t, s)])
        rows.append({"frame_num": t, "spatial_size": s, "tokens_per_clip": t * (s // 16) ** 2, "batch": batch,
                     "clips_per_s_median": batch / step, "clips_per_s_best": batch / min(seconds[(t, s)]),
                     "step_s": seconds[(t, s)], "gflop_per_clip": flops / batch / 1e9,
                     "gflop_per_s": flops / step / 1e9})
    base = rows[0]["clips_per_s_median"]
    for row in rows:
        row["relative_to_first"] = row["clips_per_s_median"] / base
    return rows


def plot_grid(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for frames in sorted({row["frame_num"] for row in rows}):
        mine = [row for row in rows if row["frame_num"] == frames]
        ax.plot([row["spatial_size"] for row in mine], [row["clips_per_s_median"] for row in mine], marker="o",
                label=f"{frames} frames")
    ax.set_xlabel("spatial_size (px)")
    ax.set_ylabel("training clips/s (median)")
    ax.set_xticks(sorted({row["spatial_size"] for row in rows}))
    ax.set_ylim(bottom=0)
    ax.set_title("tiny preset, forward + backward, CPU")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- (b) study trials/hour with 1 vs 2 local workers ---

def _tune_env(work: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("MLFLOW_RUN_ID", None)
    for var in [v for v in env if v.startswith("SLURM_")]:  # may itself run inside a SLURM job
        env.pop(var)
    return env


def run_study(work: Path, cache: Path, workers: int, trials: int, settings: dict[str, Any]) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from deepsports.tune.study import open_storage

    work.mkdir(parents=True)
    (work / "space.yaml").write_text(SPACE)
    storage = str(work / "study.journal")
    sets = [a for k, v in {**settings, "cache_dir": str(cache)}.items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "deepsports.cli", "tune", str(work / "space.yaml"), "--study", "bench",
               "--storage", storage, "--workers", str(workers), "--max-trials", str(trials), "--pruner", "none",
               "--seed", "0", *sets]
    load_before = load_average()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = datetime.now()  # Optuna stamps trials with naive local datetime.now()
    started = time.perf_counter()
    done = subprocess.run(command, env=_tune_env(work), cwd=work, capture_output=True, text=True)
    end_to_end = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its workers, once waited for
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"deepsports tune --workers {workers} exited {done.returncode}:\n{done.stderr[-4000:]}")
    study = optuna.load_study(study_name="bench", storage=open_storage(storage))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) != trials:
        raise SystemExit(f"deepsports tune --workers {workers} completed {len(complete)} of {trials} trials:\n"
                         f"{done.stderr[-4000:]}")
    first_start, last_end = min(t.datetime_start for t in complete), max(t.datetime_complete for t in complete)
    span = (last_end - first_start).total_seconds()
    before_first = (first_start - launched).total_seconds()
    return {"workers": workers, "trials": trials, "span_s": span, "end_to_end_s": end_to_end,
            "trials_per_hour": trials / span * 3600, "trials_per_hour_end_to_end": trials / end_to_end * 3600,
            "mean_trial_s": statistics.mean((t.datetime_complete - t.datetime_start).total_seconds() for t in complete),
            "before_first_trial_s": before_first, "after_last_trial_s": end_to_end - before_first - span,
            "cpu_s": cpu_s, "cpu_s_per_wall_s": cpu_s / end_to_end, "loadavg_1min": [load_before, load_average()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=_int_list, default=[8, 16], help="frame_num values, e.g. 8,16")
    parser.add_argument("--sizes", type=_int_list, default=[112, 160, 224], help="spatial_size values (multiples of 16)")
    parser.add_argument("--batch", type=positive_int, default=4, help="clips per training step")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved timing rounds of the grid")
    parser.add_argument("--trials", type=positive_int, default=6, help="trials of each study")
    parser.add_argument("--epochs", type=positive_int, default=3, help="epochs of each trial")
    parser.add_argument("--trial-frames", type=positive_int, default=8, help="frame_num of the study's trials")
    parser.add_argument("--trial-size", type=positive_int, default=112, help="spatial_size of the study's trials")
    parser.add_argument("--skip-model", action="store_true", help="only the study part")
    parser.add_argument("--skip-study", action="store_true", help="only the model part")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 frames x 112/160, batch 2, 1 round; "
                                                            "4 trials of 2 epochs at 4 x 32 px")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures here (and the plot as .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.sizes, args.batch, args.rounds = [8], [112, 160], 2, 1
        args.trials, args.epochs, args.trial_frames, args.trial_size = 4, 2, 4, 32
    bad_sizes = [s for s in [*args.sizes, args.trial_size] if s % 16]
    if bad_sizes:
        parser.error(f"sizes {bad_sizes}: the model's patches are 16 px, so sizes must be multiples of 16")

    info = machine()
    print_machine(info)
    results: dict[str, Any] = {"machine": info}

    if not args.skip_model:
        rows = bench_model_grid(args.frames, args.sizes, args.batch, args.rounds)
        results["model_grid"] = rows
        first = rows[0]
        print(f"\n(a) tiny preset, forward + backward on the CPU, batch {args.batch}, synthetic input, median of "
              f"{args.rounds} interleaved rounds ({torch.get_num_threads()} torch threads):")
        print(f"| frames x size | tokens/clip | clips/s (median) | clips/s (best) | vs {first['frame_num']} x "
              f"{first['spatial_size']} | GFLOP/clip | GFLOP/s |\n|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['frame_num']} x {row['spatial_size']} | {row['tokens_per_clip']} | "
                  f"{row['clips_per_s_median']:.2f} | {row['clips_per_s_best']:.2f} | {row['relative_to_first']:.3f}x | "
                  f"{row['gflop_per_clip']:.2f} | {row['gflop_per_s']:.1f} |", flush=True)
        if args.json:
            png = Path(args.json).with_suffix(".png")
            png.parent.mkdir(parents=True, exist_ok=True)
            plot_grid(rows, png)
            print(f"wrote {png}")

    if not args.skip_study:
        work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-scaling-"))
        try:
            from deepsports.config import build_config
            from deepsports.data import build_datasets

            cache = work / "cache"
            settings = {**TINY, "frame_num": args.trial_frames, "spatial_size": args.trial_size, "epochs": args.epochs}
            build_datasets(build_config({**settings, "cache_dir": str(cache)}), progress=False)  # untimed
            studies = [run_study(work / f"workers{n}", cache, n, args.trials, settings) for n in (1, 2)]
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        results["study"] = studies
        one, two = studies
        results["study_speedup"] = {"span": two["trials_per_hour"] / one["trials_per_hour"],
                                    "end_to_end": two["trials_per_hour_end_to_end"] / one["trials_per_hour_end_to_end"]}
        print(f"\n(b) deepsports tune --workers N: {args.trials} trials of {args.epochs} epochs, tiny model at "
              f"{args.trial_frames} x {args.trial_size} px, OMP_NUM_THREADS=1, pruner none")
        print("| workers | trials/hour (trial span) | span s | trials/hour (end to end) | end to end s | before first "
              "trial s | after last trial s | mean trial s | CPU s per wall s | load avg |\n"
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in studies:
            print(f"| {r['workers']} | {r['trials_per_hour']:.0f} | {r['span_s']:.1f} | "
                  f"{r['trials_per_hour_end_to_end']:.0f} | {r['end_to_end_s']:.1f} | {r['before_first_trial_s']:.1f} | "
                  f"{r['after_last_trial_s']:.1f} | {r['mean_trial_s']:.1f} | {r['cpu_s_per_wall_s']:.2f} | "
                  f"{r['loadavg_1min'][0]} -> {r['loadavg_1min'][1]} |")
        speedup = results["study_speedup"]
        print(f"speed-up 2 vs 1 workers: {speedup['span']:.2f}x (trial span), {speedup['end_to_end']:.2f}x "
              f"(end to end) [target >= 1.8x on 2 idle cores]")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
