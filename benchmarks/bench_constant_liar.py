"""TPE's constant liar with two parallel workers: are concurrently proposed configurations less alike?

    python benchmarks/bench_constant_liar.py [--seeds 6] [--trials 40] [--quick] [--json out.json]

Two worker threads share one study in a journal file (as two ``deepsports tune`` workers share one
on a file system), each with its own sampler from :func:`deepsports.tune.study.make_sampler` (the
worker seeds differ, as :func:`deepsports.tune.study.worker_seed` makes them), once with
``constant_liar=False`` and once with ``True`` (the default). A trial "trains" for a random
50-150 ms and scores ``1 - |x - x*|^2`` on a 3-parameter space (learning rate on a log scale,
dropout, weight decay), so the workers' trials overlap as real trials do.

The measure: whenever a worker is handed a configuration, its distance to every configuration the
other worker is training at that moment (Euclidean in the unit cube, log-scaled parameters on their
log scale; the largest possible distance is sqrt(3) = 1.73), over the TPE-modelled trials only (after
the random startup trials). Reported: the mean and median of those distances, and the share of
pairs closer than 0.1 (near-duplicates), over all seeds.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import optuna
from _common import finish, machine, positive_int, print_machine
from optuna.trial import TrialState

from deepsports.tune.study import make_sampler, open_storage, worker_seed

SPACE = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
         "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
         "weight_decay": optuna.distributions.FloatDistribution(0.0, 0.1)}
OPTIMUM = {"learning_rate": 0.3, "dropout": 0.4, "weight_decay": 0.7}  # in unit-cube coordinates
STARTUP = 5


def unit(params: dict[str, float]) -> list[float]:
    out = []
    for name, dist in SPACE.items():
        value, low, high = params[name], dist.low, dist.high
        if dist.log:
            value, low, high = math.log(value), math.log(low), math.log(high)
        out.append((value - low) / (high - low))
    return out


def worker(study_name: str, storage_path: str, seed: int, worker_id: int, trials: int, liar: bool,
           pairs: list[float], lock: threading.Lock) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_path),
                                  sampler=make_sampler(worker_seed(seed, worker_id), STARTUP, constant_liar=liar))
    rng = random.Random(seed * 7 + worker_id)
    for _ in range(trials):
        with lock:  # ask and look at the others atomically, so "running now" is exact
            trial = study.ask(SPACE)
            modelled = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= STARTUP
            others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.number != trial.number]
        mine = unit(trial.params)
        if modelled:
            pairs.extend(math.dist(mine, unit(t.params)) for t in others)
        time.sleep(rng.uniform(0.05, 0.15))
        study.tell(trial, 1.0 - sum((a - b) ** 2 for a, b in zip(mine, OPTIMUM.values())))


def run(seed: int, trials: int, liar: bool, root: Path) -> list[float]:
    path = str(root / f"liar{int(liar)}-seed{seed}.journal")
    optuna.create_study(study_name="s", storage=open_storage(path), direction="maximize")
    pairs: list[float] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=("s", path, seed, w, trials, liar, pairs, lock)) for w in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive_int, default=6)
    parser.add_argument("--trials", type=positive_int, default=40, help="trials per worker")
    parser.add_argument("--quick", action="store_true", help="2 seeds x 15 trials")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials = 2, 15
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info = machine()
    print_machine(info)
    results: dict = {"machine": info, "seeds": args.seeds, "trials_per_worker": args.trials, "startup": STARTUP}
    with tempfile.TemporaryDirectory() as tmp:
        for liar in (False, True):
            pairs = [d for seed in range(args.seeds) for d in run(seed, args.trials, liar, Path(tmp))]
            row = {"pairs": len(pairs), "mean": statistics.fmean(pairs), "median": statistics.median(pairs),
                   "near_duplicates": sum(d < 0.1 for d in pairs) / len(pairs)}
            results[f"constant_liar={liar}"] = row
            print(f"constant_liar={liar!s:5}: {row['pairs']} concurrent pairs, distance mean {row['mean']:.3f}, "
                  f"median {row['median']:.3f}, closer than 0.1: {100 * row['near_duplicates']:.1f} %")
    off, on = results["constant_liar=False"], results["constant_liar=True"]
    results["mean_ratio"] = on["mean"] / off["mean"]
    print(f"mean distance with / without the liar: {results['mean_ratio']:.2f}x")
    finish(results, args.json)


if __name__ == "__main__":
    main()
