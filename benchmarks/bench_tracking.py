"""Cost of experiment tracking: real training with MLflow + an Optuna trial vs with tracking disabled.

    python benchmarks/bench_tracking.py [--pairs 5] [--epochs 3] [--clips 48] [--quick] [--json out.json]

Both modes run ``deepsports.train.train`` in this process on the same synthetic set and config (tiny
backbone, 8 frames x 112 px by default, evaluation and model logging on, ``resume=never``):

* **tracked**: the real :class:`deepsports.tracking.RunTracker` on a SQLite store in a temp dir, and an
  ``epoch_callback`` doing what a study trial does after each epoch: ``trial.report`` and
  ``trial.should_prune`` (median pruner, no start-up trials) on a real Optuna study in a journal file.
  The pruning decision is recorded but not acted on, so every run trains the same epochs; the trial
  is asked before and told after the run (timed separately).
* **untracked**: ``deepsports.tracking.NullTracker`` (the no-op tracker of non-zero DDP ranks) in
  place of ``RunTracker``, and no Optuna.

Runs alternate (tracked, untracked, tracked, ...) after one untimed 1-epoch warm-up of each mode, and
medians are compared. Timing points come from ``train``'s own ``fault_hook`` (first step, before the
epoch's metrics are logged) and the epoch callback: ``loop`` is first step to the last epoch's
callback (train + val + checkpoint + logging of every epoch), ``setup`` is the call until the first
step, ``end`` is after the last callback until ``train`` returns (best-checkpoint evaluation, plots,
and for tracked runs the artifact and model logging), ``wall`` the whole call. ``epoch_seconds`` is
train's own per-epoch figure (train + val), which by construction holds no tracking call: its
A/B difference shows the noise. The tracking work itself is also timed directly (wall time inside
RunTracker methods per phase, and inside the Optuna calls), which does not depend on machine noise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
from _common import finish, machine, median, positive_int, print_machine  # noqa: E402

import deepsports.train.loop  # noqa: E402
from deepsports.config import build_config  # noqa: E402
from deepsports.data import build_datasets  # noqa: E402
from deepsports.tracking import runs  # noqa: E402
from deepsports.train.loop import train  # noqa: E402
from deepsports.train.state import TrainHooks  # noqa: E402
from deepsports.tune.study import open_storage  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

MODES = ("tracked", "untracked")
PHASES = ("setup", "loop", "end")


def null_tracker_class() -> type:
    """The no-op tracker train() gives non-zero DDP ranks; the untracked runs put it in RunTracker's place."""
    found = getattr(runs, "NullTracker", None)
    if found is None:
        raise SystemExit("bench_tracking: deepsports.tracking.NullTracker not found (this checkout predates it)")
    return found


class _Probe:
    """Timestamps of one train() call, taken from its fault_hook and epoch callback."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.perf_counter()
        self.first_step: float | None = None
        self.loop_done = False
        self.last_callback: float | None = None
        self.before_log: dict[int, float] = {}
        self.log_and_callback_s: list[float] = []

    def fault_hook(self, where: str, index: int) -> None:
        now = time.perf_counter()
        if where == "step" and self.first_step is None:
            self.first_step = now
        elif where == "log":
            self.before_log[index] = now

    def epoch_done(self, epoch: int) -> None:
        self.last_callback = time.perf_counter()
        self.log_and_callback_s.append(self.last_callback - self.before_log[epoch])
        self.loop_done = epoch == self.epochs

    def phase(self) -> str:
        if self.first_step is None:
            return "setup"
        return "end" if self.loop_done else "loop"


def _timed_tracker(base: type, probe: _Probe, seconds: dict[str, float]) -> type:
    """``base`` (the real RunTracker) with the wall time of its outermost public calls added to ``seconds[phase]``."""
    depth = {"n": 0}

    def wrap(name: str):
        method = getattr(base, name)

        def timed(self, *args, **kwargs):
            if depth["n"]:
                return method(self, *args, **kwargs)
            depth["n"] += 1
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                depth["n"] -= 1
                seconds[probe.phase()] += time.perf_counter() - start

        return timed

    names = ["start", "end", "log_params", "log_metrics", "set_tags", "log_artifact", "log_artifacts", "log_text",
             "log_dict", "logged_steps", "log_model", "_open_store"]
    return type("TimedRunTracker", (base,), {name: wrap(name) for name in names if hasattr(base, name)})


@contextlib.contextmanager
def _tracker_class(cls: type) -> Iterator[None]:
    original = deepsports.train.loop.RunTracker
    deepsports.train.loop.RunTracker = cls  # train() looks it up in its module at each call
    try:
        yield
    finally:
        deepsports.train.loop.RunTracker = original


def run_once(mode: str, values: dict[str, Any], work: Path, index: int, study: optuna.Study | None,
             null_cls: type) -> dict[str, Any]:
    config = build_config({**values, "checkpoint_dir": str(work / "checkpoints" / f"{mode}-{index}"),
                           "run_name": f"bench-{mode}-{index}"})
    probe = _Probe(config.epochs)
    tracker_seconds = dict.fromkeys(PHASES, 0.0)
    optuna_seconds = {"ask": 0.0, "report_and_prune": 0.0, "tell": 0.0}
    prune_said = []
    trial = None
    if mode == "tracked":
        cls = _timed_tracker(runs.RunTracker, probe, tracker_seconds)
        start = time.perf_counter()
        trial = study.ask()
        optuna_seconds["ask"] = time.perf_counter() - start
    else:
        cls = null_cls

    def on_epoch(report) -> None:
        if trial is not None:
            start = time.perf_counter()
            if report.epoch == 1:
                trial.set_user_attr("mlflow_run_id", report.run_id)  # what the tune worker records
            value = report.metrics["val_spearman"]
            if math.isfinite(value):
                trial.report(value, report.epoch)
            prune_said.append(trial.should_prune())
            optuna_seconds["report_and_prune"] += time.perf_counter() - start
        probe.epoch_done(report.epoch)

    probe.started = time.perf_counter()
    with _tracker_class(cls):
        result = train(config, hooks=TrainHooks(epoch_callback=on_epoch, fault_hook=probe.fault_hook))
    finished = time.perf_counter()
    if trial is not None:
        start = time.perf_counter()
        study.tell(trial, result.best_val_spearman if math.isfinite(result.best_val_spearman) else 0.0)
        optuna_seconds["tell"] = time.perf_counter() - start
    epochs = [row["epoch_seconds"] for row in result.history]
    return {"mode": mode, "run": index, "wall_s": finished - probe.started,
            "setup_s": probe.first_step - probe.started, "loop_s": probe.last_callback - probe.first_step,
            "end_s": finished - probe.last_callback, "epoch_seconds_sum": sum(epochs), "epoch_seconds": epochs,
            "per_epoch_log_and_callback_s": probe.log_and_callback_s,
            "tracker_seconds": tracker_seconds if mode == "tracked" else None,
            "optuna_seconds": optuna_seconds if mode == "tracked" else None,
            "prune_decisions": prune_said or None}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    keys = ("epoch_seconds_sum", "loop_s", "setup_s", "end_s", "wall_s")
    med = {mode: {key: median(r[key] for r in rows) for key in keys} for mode, rows in by_mode.items()}
    tracked, untracked = med["tracked"], med["untracked"]
    rows = by_mode["tracked"]
    epochs = len(rows[0]["epoch_seconds"])
    direct = {phase: median(r["tracker_seconds"][phase] for r in rows) for phase in PHASES}
    optuna_s = {key: median(r["optuna_seconds"][key] for r in rows) for key in rows[0]["optuna_seconds"]}
    per_epoch_direct = (direct["loop"] + optuna_s["report_and_prune"]) / epochs
    return {
        "median": med,
        "overhead_pct": {key: (tracked[key] / untracked[key] - 1) * 100 for key in keys},
        "direct": {"tracker_s_by_phase": direct, "optuna_s": optuna_s,
                   "tracking_s_per_epoch": per_epoch_direct,
                   "tracking_pct_of_epoch": per_epoch_direct / (untracked["loop_s"] / epochs) * 100,
                   "log_and_callback_s_per_epoch": {
                       mode: median(sum(r["per_epoch_log_and_callback_s"]) / epochs for r in rows_)
                       for mode, rows_ in by_mode.items()}},
        "end_of_run_logging_s": {"tracker_calls": direct["end"], "end_phase_difference": tracked["end_s"] - untracked["end_s"]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=positive_int, default=5, help="timed (tracked, untracked) pairs")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--clips", type=positive_int, default=48, help="synthetic clips (about 60%% train, 15%% val)")
    parser.add_argument("--frames", type=positive_int, default=8, help="frame_num")
    parser.add_argument("--size", type=positive_int, default=112, help="spatial_size")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 pair of 2 epochs on 32 clips of 4 x 64 px")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.epochs, args.clips, args.frames, args.size = 1, 2, 32, 4, 64

    null_cls = null_tracker_class()
    info = machine()
    print_machine(info)
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    work.mkdir(parents=True, exist_ok=True)
    previous_cwd, previous_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    values = {"backbone": "tiny", "synth_clips": args.clips, "frame_num": args.frames, "spatial_size": args.size,
              "batch_size": 8, "num_workers": 0, "epochs": args.epochs, "warmup_epochs": 0, "evaluate": True,
              "log_model": True, "resume": "never", "loglevel": "WARNING", "cache_dir": str(work / "cache"),
              "experiment_name": "bench-tracking"}
    results: dict[str, Any] = {"machine": info, "config": values, "runs": []}
    try:
        os.chdir(work)  # checkpoints/, MLflow artifacts and plots stay in the temp dir
        os.environ.pop("MLFLOW_RUN_ID", None)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        build_datasets(build_config(values), progress=False)  # untimed: synthetic set + clip cache
        study = optuna.create_study(study_name="bench", storage=open_storage(str(work / "study.journal")),
                                    direction="maximize",
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0))
        print(f"config: tiny backbone, {args.clips} clips, {args.frames} x {args.size} px, batch 8, {args.epochs} epochs, "
              f"evaluate + log_model on; {args.pairs} timed pairs after a 1-epoch warm-up of each mode", flush=True)
        warm = {**values, "epochs": 1}
        for mode in MODES:
            run_once(mode, warm, work, -1, study, null_cls)
        for index in range(args.pairs):
            for mode in MODES:
                run = run_once(mode, values, work, index, study, null_cls)
                results["runs"].append(run)
                print(f"  {mode:9s} run {index}: wall {run['wall_s']:6.2f} s, loop {run['loop_s']:6.2f} s, "
                      f"epoch_seconds {run['epoch_seconds_sum']:6.2f} s, setup {run['setup_s']:5.2f} s, "
                      f"end {run['end_s']:5.2f} s", flush=True)
    finally:
        os.chdir(previous_cwd)
        if previous_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_uri
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(results["runs"])
    results["summary"] = summary
    med, over, direct = summary["median"], summary["overhead_pct"], summary["direct"]
    print(f"\nmedians of {args.pairs} runs each ({args.epochs} epochs per run):")
    print("| figure | tracked (MLflow + Optuna) s | untracked s | overhead |\n|---|---:|---:|---:|")
    labels = {"epoch_seconds_sum": "sum of epoch_seconds (train + val; no tracking call inside)",
              "loop_s": "epoch loop (train + val + checkpoint + per-epoch logging)",
              "setup_s": "setup (run start, params, tags, data, model)",
              "end_s": "end of run (best-checkpoint eval, plots, artifacts + model)", "wall_s": "whole train() call"}
    for key, label in labels.items():
        print(f"| {label} | {med['tracked'][key]:.2f} | {med['untracked'][key]:.2f} | {over[key]:+.1f} % |")
    per_epoch_loop = med["untracked"]["loop_s"] / args.epochs
    print(f"\nmeasured directly in the tracked runs (median): per epoch {direct['tracking_s_per_epoch'] * 1000:.1f} ms "
          f"in RunTracker + Optuna calls = {direct['tracking_pct_of_epoch']:.2f} % of an untracked epoch "
          f"({per_epoch_loop:.2f} s) [target <= 2 %]")
    print("  RunTracker seconds by phase: " + ", ".join(f"{k} {v:.3f}" for k, v in direct["tracker_s_by_phase"].items()))
    print("  Optuna seconds: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in direct["optuna_s"].items())
          + " (report_and_prune summed over the epochs)")
    print(f"  from 'before logging' to the end of the epoch callback, per epoch: tracked "
          f"{direct['log_and_callback_s_per_epoch']['tracked'] * 1000:.1f} ms, untracked "
          f"{direct['log_and_callback_s_per_epoch']['untracked'] * 1000:.1f} ms")
    end = summary["end_of_run_logging_s"]
    print(f"one-off end-of-run artifact + model logging (not in the epoch figures): {end['tracker_calls']:.2f} s in "
          f"RunTracker calls; end phase tracked - untracked = {end['end_phase_difference']:.2f} s")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
