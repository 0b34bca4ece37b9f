"""``deepsports tune|best|submit``: the study and SLURM subcommands (parsers + calls into the library)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from deepsports.errors import ConfigError, PreemptedError


def _positive_or_none(text: str) -> int | None:
    value = int(text) if float(text).is_integer() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0 (0 = no limit)")
    return value or None


def _seconds_or_none(text: str) -> float | None:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds >= 0 (0 = no limit)")
    return value or None


def _add_tune_arguments(p: argparse.ArgumentParser) -> None:
    from deepsports.tune.study import DEFAULT_STORAGE, PRUNERS

    p.add_argument("search_space", help="search-space YAML: a path or a name under search_spaces/ (e.g. head)")
    p.add_argument("--study", required=True, help="study name (created, or joined when it exists)")
    p.add_argument("--storage", default=os.environ.get("DEEPSPORTS_STUDY_STORAGE", DEFAULT_STORAGE),
                   help="Optuna storage: a journal file path (default, safe on shared file systems), sqlite:///... "
                        f"or postgresql://... [$DEEPSPORTS_STUDY_STORAGE or {DEFAULT_STORAGE}]")
    p.add_argument("--n-trials", type=_positive_or_none, default=None, help="trials this worker runs (0 = no limit)")
    p.add_argument("--max-trials", type=_positive_or_none, default=None,
                   help="trials of the whole study, counted across all workers (0 = no limit)")
    p.add_argument("--timeout", type=_seconds_or_none, default=None, help="seconds this worker runs (0 = no limit)")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="pruner [median]")
    p.add_argument("--seed", type=int, default=0, help="sampler seed, mixed with the worker id [0]")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes on this machine, all on the same study (without SLURM) [1]")
    p.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between the heartbeats of a running trial (every storage) [60]")
    p.add_argument("--grace-period", type=int, default=None,
                   help="a RUNNING trial without heartbeat for this long is failed and retried with the same "
                        "params, resuming its checkpoint (a paused, preempted trial is WAITING and never "
                        "expires) [2 x heartbeat]")
    p.add_argument("--max-retry", type=int, default=3, help="re-runs of a dead worker's trial [3]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every trial (e.g. --set epochs=3 --set cache_dir=/scratch/x)")
    _add_relaunch_arguments(p)


def _add_relaunch_arguments(p: argparse.ArgumentParser) -> None:
    """The targeted re-launch options of ``tune`` (TuneSettings.rerun_failed / rerun_causes)."""
    from deepsports.tune.accounting import CAUSES

    p.add_argument("--rerun-failed", action="store_true",
                   help="queue the params of the study's failed trials again as new linked trials (fresh training), "
                        "run those and sample nothing new")
    p.add_argument("--cause", dest="rerun_causes", action="append", default=[], metavar="CAUSE",
                   help=f"with --rerun-failed: only trials failed for this cause (repeatable; {', '.join(CAUSES)}) "
                        "[every cause but not_run]")


def _tune_settings(args: argparse.Namespace):
    from deepsports.config import parse_overrides
    from deepsports.tune.worker import TuneSettings

    return TuneSettings(search_space=args.search_space, study_name=args.study, storage=args.storage,
                        n_trials=args.n_trials, timeout=args.timeout, max_trials=args.max_trials, pruner=args.pruner,
                        seed=args.seed, worker_id=args.worker_id, heartbeat_interval=args.heartbeat,
                        grace_period=args.grace_period, max_retry=args.max_retry,
                        overrides=parse_overrides(args.overrides), rerun_failed=args.rerun_failed,
                        rerun_causes=tuple(args.rerun_causes))


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers}: expected 1 or more")
    if args.workers > 1:
        if args.rerun_failed:  # queued once here, before the workers race to queue them
            _enqueue_reruns(args.study, args.storage, args.rerun_causes)
        return _run_local_workers(args)  # before any heavy import: the workers start at once
    from deepsports.train.distributed import detect

    if detect().enabled:
        raise ConfigError("deepsports tune runs each trial in one process and cannot run under torchrun or a "
                          "multi-task srun: use --workers N, or an array job (deepsports submit tune)")
    from deepsports.slurm.jobs import requeue_if_slurm
    from deepsports.slurm.preemption import PreemptionFlag
    from deepsports.tune.worker import tune

    settings = _tune_settings(args)
    with PreemptionFlag() as flag:
        try:
            summary = tune(settings, stop_requested=flag.requested)
        except PreemptedError:
            requeue_if_slurm()
            raise
    _tag_project_run(summary.parent_run_id)
    print(json.dumps({"study": summary.study_name, "parent_run_id": summary.parent_run_id, "states": summary.states,
                      "trials_run_by_this_worker": summary.trials_run, "best_value": summary.best_value,
                      "best_trial": summary.best_number, "best_params": summary.best_params,
                      "best_run_id": summary.best_run_id}, indent=2, default=str))
    return 0


def _tag_project_run(parent_run_id: str) -> None:
    """Inside ``mlflow run -e tune`` the project's own run points at the study's parent run."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id and run_id != parent_run_id:
        from deepsports.tracking import runs as tracking

        tracker = tracking.RunTracker()
        tracker.start(run_id=run_id)
        tracker.set_tags({"deepsports.study_parent_run_id": parent_run_id})


def _run_local_workers(args: argparse.Namespace) -> int:
    """``--workers N``: N processes of this same command, each one worker (worker ids 0..N-1).

    This process plays the scheduler's part: a worker that was stopped alone (SIGUSR1/SIGTERM sent to
    its pid; it paused its trial and exited 75) is started again with the same worker id, as SLURM
    requeues a task, and resumes the paused trial. A signal sent to this process goes to every worker
    and nobody restarts.
    """
    import time

    base = _strip_option(list(args.argv), "--workers")
    cores = os.cpu_count() or 1
    threads = str(max(1, cores // args.workers))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    env.pop("MLFLOW_RUN_ID", None)  # the project run belongs to this parent process

    def start(worker_id: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "deepsports.cli", *base, "--worker-id", str(worker_id)], env=env)

    running = {worker_id: start(worker_id) for worker_id in range(args.workers)}
    restarts = dict.fromkeys(running, 0)
    codes: dict[int, int] = {}
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        for proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        while running:
            for worker_id, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                if code == PreemptedError.exit_code and not stopping and restarts[worker_id] < _MAX_LOCAL_RESTARTS:
                    restarts[worker_id] += 1
                    print(f"deepsports: tune worker {worker_id} was stopped (exit {code}); restarting it "
                          f"(restart {restarts[worker_id]})", file=sys.stderr)
                    running[worker_id] = start(worker_id)
                    continue
                codes[worker_id] = code
                del running[worker_id]
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [code for code in codes.values() if code != 0]
    if failed:
        print(f"deepsports: {len(failed)} of {len(codes)} tune workers failed (exit codes "
              f"{[codes[w] for w in sorted(codes)]})", file=sys.stderr)
        return 75 if all(code == 75 for code in failed) else max(failed)
    return 0


#: How often ``--workers N`` restarts one stopped worker (a worker stopped more often stays stopped).
_MAX_LOCAL_RESTARTS = 10


def _strip_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == name:
            skip = True
            continue
        if item.startswith(name + "="):
            continue
        out.append(item)
    return out


def _existing_study(name: str, storage: str):
    """The study, or a ConfigError (exit 2) naming the study and the storage given."""
    from deepsports.errors import StorageError
    from deepsports.tune.report import load_existing_study

    try:
        return load_existing_study(name, storage)
    except StorageError as exc:
        raise ConfigError(f"study {name!r} (--storage {storage}): {exc}") from exc


def _enqueue_reruns(name: str, storage: str, causes: list[str]) -> list[tuple[int, int]]:
    from deepsports.tune.accounting import check_causes, enqueue_reruns

    checked = check_causes(causes)
    return enqueue_reruns(_existing_study(name, storage), checked)


def _cmd_status(args: argparse.Namespace) -> int:
    from deepsports.tune.status import render_text, study_status
    from deepsports.tune.study import storage_label

    doc = study_status(_existing_study(args.study, args.storage), storage_label(args.storage))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render_text(doc), end="")
    return 0


class _ArgsError(argparse.ArgumentParser):
    """A parser for the ``tune`` arguments after ``submit tune ... --``: bad ones are a ConfigError (one line)."""

    def error(self, message: str):
        raise ConfigError(f"the tune arguments after `--`: {message}")


def _missing_work(args: argparse.Namespace, rest: list[str]) -> int:
    """``submit tune --missing``: how many array tasks the study still needs (queues the re-runs asked for)."""
    from pathlib import Path as _Path

    from deepsports.tune import accounting

    parser = _ArgsError(prog="deepsports tune", add_help=False)
    _add_tune_arguments(parser)
    tune_args = parser.parse_args(rest)
    if tune_args.max_trials is None:
        raise ConfigError("--missing: the tune arguments after `--` need --max-trials N (the study's size)")
    causes = accounting.check_causes(tune_args.rerun_causes)
    storage = tune_args.storage if any(a == "--storage" or a.startswith("--storage=") for a in rest) else (
        args.storage or tune_args.storage)
    if "://" not in str(storage) and not _Path(storage).expanduser().is_file():
        return tune_args.max_trials  # nothing run yet
    from deepsports.tune.study import open_storage
    import optuna

    try:
        study = optuna.load_study(study_name=tune_args.study, storage=open_storage(storage))
    except KeyError:
        return tune_args.max_trials
    reruns = 0
    if tune_args.rerun_failed:
        reruns = len(accounting.rerunnable(study, causes)) if args.dry_run else len(
            accounting.enqueue_reruns(study, causes))
    trials = study.get_trials(deepcopy=False)
    left = accounting.work_left(trials, tune_args.max_trials, reruns if args.dry_run else 0)
    if left == 0:
        states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
        print(f"study {tune_args.study!r} is complete ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
              f"{states['FAIL']} failed of max_trials={tune_args.max_trials}; nothing runs or waits): nothing submitted")
    return left


def _cmd_best(args: argparse.Namespace) -> int:
    from deepsports.tune.report import best_trial, export_best, load_existing_study, log_study_plots, retrain_best

    study = load_existing_study(args.study, args.storage)
    best = best_trial(study)
    path = export_best(best, args.out or Path("experiments") / f"{args.study}_best.yaml")
    plots = log_study_plots(study)
    result: dict[str, Any] = {"study": best.study_name, "best_trial": best.number, "value": best.value,
                              "params": best.params, "run_id": best.run_id, "parent_run_id": best.parent_run_id,
                              "config_file": str(path), "plots": plots}
    if args.retrain:
        from deepsports.config import parse_overrides

        trained = retrain_best(best, epochs=args.epochs, overrides=parse_overrides(args.overrides))
        result["retrain"] = {"run_id": trained.run_id, **{f"test_{k}": v for k, v in trained.test_metrics.items()}}
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from deepsports.slurm import jobs as slurm
    from deepsports.tracking.runs import tracking_uri

    profile = slurm.load_profile(args.profile)
    rest = list(args.args)
    kwargs: dict[str, Any] = {}
    if args.kind == "tune":
        kwargs.update(array_size=args.array_size, array_concurrency=args.array_concurrency,
                      study_storage=args.storage)
    elif args.array_size or args.array_concurrency or args.storage or args.missing:
        raise ConfigError("--array-size, --array-concurrency, --storage and --missing apply to `submit tune` only")
    if args.missing:
        left = _missing_work(args, rest)
        if left == 0:
            return 0
        kwargs["array_size"] = min(left, args.array_size or profile.array_size)
    uri = args.tracking_uri or profile.env.get("MLFLOW_TRACKING_URI") or None
    script = slurm.render_script(args.kind, profile, slurm.worker_command(args.kind, *rest), job_name=args.job_name,
                                 tracking_uri=args.tracking_uri, **kwargs)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = slurm.submit(script)
    print(f"submitted {args.kind} job {job_id}")
    for hint in slurm.watch_hints(job_id, profile, uri or tracking_uri()):
        print(f"  {hint}")
    return 0


def register(sub) -> None:
    """Add the study and SLURM subcommands to the ``deepsports`` parser."""
    p = sub.add_parser("tune", help="run trials of an Optuna study (each a child MLflow run of the study's run)")
    _add_tune_arguments(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("best", help="the best trial of a study: print it, export its config, plot the study")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", default=os.environ.get("DEEPSPORTS_STUDY_STORAGE", "optuna-journal.log"),
                   help="Optuna storage of the study [$DEEPSPORTS_STUDY_STORAGE or optuna-journal.log]")
    p.add_argument("--out", default=None, help="config file to write [experiments/<study>_best.yaml]")
    p.add_argument("--retrain", action="store_true", help="train the best config again with evaluate=true")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the retraining run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the retraining run")
    p.set_defaults(func=_cmd_best)

    p = sub.add_parser("status", help="what happened to every trial of a study: states, failures by cause, "
                                      "pauses, retries, compute spent and lost, best")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", default=os.environ.get("DEEPSPORTS_STUDY_STORAGE", "optuna-journal.log"),
                   help="Optuna storage of the study [$DEEPSPORTS_STUDY_STORAGE or optuna-journal.log]")
    p.add_argument("--json", action="store_true", help="one JSON document (keys: README, Watching a study)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("submit", help="render an sbatch script from a profile and submit it (or --dry-run)")
    p.add_argument("kind", choices=("tune", "train", "prepare"))
    p.add_argument("--profile", default="local", help="slurm/profiles/<name>.yaml or a path [local]")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.add_argument("--job-name", default=None)
    p.add_argument("--array-size", type=int, default=None, help="tune: array tasks [profile]")
    p.add_argument("--array-concurrency", type=int, default=None, help="tune: tasks running at once [profile]")
    p.add_argument("--storage", default=None, help="tune: the study storage exported to every task")
    p.add_argument("--tracking-uri", default=None, help="MLflow store exported to every task [profile env]")
    p.add_argument("--missing", action="store_true",
                   help="tune: size the array to the study's work left (max_trials - trials created + waiting "
                        "+ re-runs asked for, at most --array-size/profile); submit nothing when it is complete")
    p.add_argument("args", nargs="*", metavar="-- ARGS",
                   help="after --, the deepsports arguments of the job, e.g. -- head --study s1 --max-trials 32")
    p.set_defaults(func=_cmd_submit)
