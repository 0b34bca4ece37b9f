"""Worker processes for the concurrency tests: ``python -m tests.reliability.workers KIND ...``.

Each prints one JSON line on stdout with what it wrote, so the test can compare written against found.
"""

from __future__ import annotations

import argparse
import json
import time


def mlflow_writer(uri: str, worker: int, steps: int, n_metrics: int, n_params: int) -> dict:
    """One run through :class:`deepsports.tracking.RunTracker`: params, ``steps`` x ``n_metrics`` points
    through ``log_metrics`` (one transaction per step) and as many through the MetricBuffer (log_batch)."""
    from deepsports.tracking.runs import RunTracker

    tick = time.perf_counter()
    tracker = RunTracker(uri)
    run_id = tracker.start(experiment_name="concurrent", run_name=f"writer-{worker}")
    tracker.log_params({f"p{j}": f"{worker}-{j}" for j in range(n_params)})
    for step in range(steps):
        tracker.log_metrics({f"m{k}": worker + step / 1000 + k for k in range(n_metrics)}, step=step)
    for step in range(steps):
        tracker.buffer.add({f"b{k}": worker - step / 1000 - k for k in range(n_metrics)}, step=step)
    tracker.set_tags({"writer": str(worker)})
    tracker.end("FINISHED")
    return {"run_id": run_id, "worker": worker, "points": 2 * steps * n_metrics, "params": n_params,
            "seconds": time.perf_counter() - tick}


def optuna_worker(storage: str, study_name: str, n_trials: int) -> dict:
    """``n_trials`` cheap trials (no training) on a shared study through :func:`deepsports.tune.study.open_storage`."""
    import optuna

    from deepsports.tune.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tick = time.perf_counter()
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, load_if_exists=True,
                                direction="maximize")
    done: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        trial.set_user_attr("pid", str(__import__("os").getpid()))
        done.append(trial.number)
        return -x * x

    study.optimize(objective, n_trials=n_trials, gc_after_trial=False)
    return {"trials": done, "seconds": time.perf_counter() - tick}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("mlflow")
    p.add_argument("uri")
    p.add_argument("worker", type=int)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--metrics", type=int, default=5)
    p.add_argument("--params", type=int, default=20)
    p = sub.add_parser("optuna")
    p.add_argument("storage")
    p.add_argument("study")
    p.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    if args.kind == "mlflow":
        out = mlflow_writer(args.uri, args.worker, args.steps, args.metrics, args.params)
    else:
        out = optuna_worker(args.storage, args.study, args.trials)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
