"""``deepsports tune|best|submit``: the study and SLURM subcommands (parsers + calls into the library)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsports.cli.status import add_status_parser, enqueue_reruns, existing_study, missing_work, study_tracking_uri
from deepsports.cli.ui import study_ui
from deepsports.errors import ConfigError
from deepsports.tags import STUDY_PARENT_RUN_TAG


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


#: How each TuneOption kind's text is parsed (argparse ``type``).
_OPTION_TYPES = {"path": None, "text": None, "int": int, "count": _positive_or_none, "seconds": _seconds_or_none,
                 "choice": None, "overrides": None, "switch": None, "list": None}


def _add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """One argument per :func:`~deepsports.tune.settings.tune_options` entry (dest = the field name)."""
    from deepsports.tune.settings import tune_options

    for name, option in tune_options().items():
        if name == "worker_id":  # before the hidden worker id, as `--help` always listed it
            p.add_argument("--workers", type=int, default=1,
                           help="local worker processes on this machine, all on the same study (without SLURM) [1]")
        help_text = argparse.SUPPRESS if option.hidden else option.help
        if not option.flag:
            p.add_argument(name, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "metavar": option.param.upper()}
        if option.required:
            kwargs["required"] = True
        else:
            default = option.cli_default
            kwargs["default"] = os.environ.get(option.env, default) if option.env else default
        if option.kind == "overrides":
            kwargs.update(action="append", default=list(option.cli_default), metavar="KEY=VALUE")
        elif option.kind == "list":
            kwargs.update(action="append", default=list(option.cli_default or ()))
        elif option.kind == "switch":
            kwargs.update(action="store_true", default=False)
            del kwargs["metavar"]
        elif option.kind == "choice":
            kwargs.update(choices=option.choices)
            del kwargs["metavar"]
        elif _OPTION_TYPES[option.kind] is not None:
            kwargs["type"] = _OPTION_TYPES[option.kind]
        p.add_argument(option.flag, **kwargs)
    p.add_argument("--under-workers", action="store_true", help=argparse.SUPPRESS)  # set by --workers N for its workers


def _tune_settings(args: argparse.Namespace):
    from deepsports.config import parse_overrides
    from deepsports.tune.settings import TuneSettings, tune_options

    values = {name: getattr(args, name) for name in tune_options()}
    values["overrides"] = parse_overrides(values["overrides"])
    values["rerun_causes"] = tuple(values["rerun_causes"])
    return TuneSettings(**values)


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers}: expected 1 or more")
    if args.workers > 1:
        _check_tune_args(args)  # once, before any worker, storage or study exists
        if args.rerun_failed:  # queued once here, before the workers race to queue them
            enqueue_reruns(args.study_name, args.storage, args.rerun_causes)
        from deepsports.tune.supervisor import run_local_workers

        code = run_local_workers(list(args.argv), args.workers)
        if code == 0:
            _print_study_summary(args)
        return code
    from deepsports.slurm.preemption import preemptible

    # First, before torch and optuna are imported (seconds): a stop signal from now on is kept, not lost.
    with preemptible() as stop:
        if not args.under_workers:
            _check_tune_args(args)  # once, before any storage or study exists
        from deepsports.train.distributed import detect

        if detect().enabled:
            raise ConfigError("deepsports tune runs each trial in one process and cannot run under torchrun or a "
                              "multi-task srun: use --workers N, or an array job (deepsports submit tune)")
        from deepsports.tune.worker import tune

        summary = tune(_tune_settings(args), stop_requested=stop.requested)
    _tag_project_run(summary.parent_run_id)
    if not args.under_workers:  # with --workers N the parent prints one summary for all
        _print_summary(summary, {"trials_run_by_this_worker": summary.trials_run})
    return 0


def _check_tune_args(args: argparse.Namespace, *, check_storage: bool = True, storage_source: str = "--storage") -> None:
    """What a tune worker would refuse, checked before any worker, storage, study or job exists."""
    from deepsports.config import parse_overrides
    from deepsports.tune.checks import check_overrides, check_rerun, check_study_name, check_trial_dirs, resolve_storage
    from deepsports.tune.search_space import load_search_space

    check_study_name(args.study_name)
    check_rerun(args.rerun_failed, args.rerun_causes)
    if check_storage:
        resolve_storage(args.storage, storage_source)
    space, overrides = load_search_space(args.search_space), parse_overrides(args.overrides)
    check_overrides(space, overrides)
    if check_storage:  # else the job runs on a SLURM node, whose folders are not ours to probe
        check_trial_dirs(space, overrides)


def _print_summary(summary, extra: dict[str, Any]) -> None:
    print(json.dumps({"study": summary.study_name, "parent_run_id": summary.parent_run_id, "states": summary.states,
                      **extra, "best_value": summary.best_value, "best_trial": summary.best_number,
                      "best_params": summary.best_params, "best_run_id": summary.best_run_id,
                      "ui": study_ui(summary.parent_run_id)}, indent=2, default=str))


def _print_study_summary(args: argparse.Namespace) -> None:
    from deepsports.tune.report import load_existing_study
    from deepsports.tune.study import summarize

    summary = summarize(load_existing_study(args.study_name, args.storage))
    _print_summary(summary, {"workers": args.workers})


def _tag_project_run(parent_run_id: str) -> None:
    """Inside ``mlflow run -e tune`` the project's own run points at the study's parent run."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id and run_id != parent_run_id:
        from deepsports.slurm.env import run_tags
        from deepsports.tracking.runs import RunTracker

        tracker = RunTracker()
        tracker.start(run_id=run_id, cluster=run_tags())
        tracker.set_tags({STUDY_PARENT_RUN_TAG: parent_run_id})


def _cmd_best(args: argparse.Namespace) -> int:
    from deepsports.tune.checks import check_study_name

    check_study_name(args.study, "study")
    if args.seeds is not None and not args.retrain:
        raise ConfigError(f"--seeds {args.seeds} needs --retrain (it sets how many seeds the retraining runs)")
    if args.seeds is not None and args.seeds < 2:
        raise ConfigError(f"--seeds {args.seeds}: expected 2 or more (one seed is a plain --retrain)")
    if args.register is not None and (not args.retrain or args.seeds is not None):
        raise ConfigError(f"--register {args.register} needs --retrain without --seeds (it registers the retrained "
                          "run's model)")
    from deepsports.tune.report import best_trial, export_best, log_study_plots, retrain_best

    study = existing_study(args.study, args.storage)  # a missing study exits 2, as in `status`
    uri, best = study_tracking_uri(study, needed=True), best_trial(study)
    # Everything is checked: only now is anything written (the config file, the plots).
    path = export_best(best, args.out or Path("experiments") / f"{args.study}_best.yaml")
    plots = log_study_plots(study, uri)
    result: dict[str, Any] = {"study": best.study_name, "best_trial": best.number, "value": best.value,
                              "params": best.params, "run_id": best.run_id, "parent_run_id": best.parent_run_id,
                              "config_file": str(path), "plots": plots}
    if args.retrain:
        from deepsports.config import parse_overrides

        if args.seeds is not None:
            import functools

            from deepsports.train.seeds import train_seeds

            trained = retrain_best(best, epochs=args.epochs, overrides=parse_overrides(args.overrides),
                                   train_fn=functools.partial(train_seeds, n_seeds=args.seeds))
            result["retrain"] = {"parent_run_id": trained.run_id, "seeds": trained.seeds, "run_ids": trained.run_ids,
                                 **trained.test_metrics}
        else:
            overrides = parse_overrides(args.overrides)
            if args.register is not None:
                overrides["log_model"] = "true"  # what the registry holds
            trained = retrain_best(best, epochs=args.epochs, overrides=overrides)
            result["retrain"] = {"run_id": trained.run_id,
                                 **{f"test_{k}": v for k, v in trained.test_metrics.items()}}
            if args.register is not None:
                from deepsports.tracking.registry import register_retrained

                result["registered"] = register_retrained(trained.run_id, args.register, best.study_name, best.number)
    result["ui"] = study_ui(best.parent_run_id)
    if "retrain" in result:
        from deepsports.tracking.ui import run_link
        from deepsports.tracking.uris import tracking_uri

        result["retrain"]["ui"] = run_link(tracking_uri(), result["retrain"].get("run_id")
                                           or result["retrain"]["parent_run_id"])
    print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from deepsports.slurm import jobs as slurm
    from deepsports.slurm.folders import check_job_cache_dir, check_job_journal
    from deepsports.slurm.profile import load_profile
    from deepsports.tracking.uris import redact_uri, tracking_uri

    profile = load_profile(args.profile)
    rest = list(args.args)
    kwargs: dict[str, Any] = {}
    if args.kind == "tune":
        storage, where, cache = _check_submitted_tune(rest, args.storage, profile)
        kwargs.update(array_size=args.array_size, array_concurrency=args.array_concurrency,
                      study_storage=args.storage if args.storage is not None or "--storage" in rest else storage)
        check_job_journal(storage, where, profile)
    elif args.array_size or args.array_concurrency or args.storage or args.missing:
        raise ConfigError("--array-size, --array-concurrency, --storage and --missing apply to `submit tune` only")
    else:
        cache = _check_submitted_config(args.kind, rest, args.build_parser)
    check_job_cache_dir(args.kind, cache, profile)
    if args.missing:
        job = _strict(argparse.ArgumentParser(prog="deepsports tune", add_help=False), "tune")
        _add_tune_arguments(job)
        left = missing_work(job.parse_args(rest), storage, profile, dry_run=args.dry_run)
        if left == 0:
            return 0
        kwargs["array_size"] = min(left, args.array_size or profile.array_size)
    if profile.time is None and not args.dry_run:
        print(f"deepsports: warning: SLURM profile {profile.source} sets no `time`: the job gets the partition's "
              "limit (UNLIMITED on many clusters), so the USR1 before the time limit never comes and a job killed "
              "at the limit loses its last epoch; set `time:` in the profile", file=sys.stderr)
    uri = args.tracking_uri or profile.env.get("MLFLOW_TRACKING_URI") or None
    script = slurm.render_script(args.kind, profile, slurm.worker_command(args.kind, *rest), job_name=args.job_name,
                                 tracking_uri=args.tracking_uri, **kwargs)
    if args.dry_run:
        shown = redact_uri(script)
        if shown != script:
            shown += "# (passwords shown as *** here; the submitted script carries them)\n"
        print(shown, end="")
        return 0
    job_id = slurm.submit(script)
    print(f"submitted {args.kind} job {job_id}")
    if args.kind == "tune":
        print(f"  study storage: {redact_uri(storage)}{where}")
    for hint in slurm.watch_hints(job_id, profile, uri or tracking_uri()):
        print(f"  {redact_uri(hint)}")
    return 0


class _JobArgumentError(ConfigError):
    """A job argument after ``--`` that the job would refuse."""


def _strict(parser: argparse.ArgumentParser, kind: str) -> argparse.ArgumentParser:
    """A parser of a job's arguments that raises (one line, exit 2) instead of printing usage and exiting."""
    def error(message: str):
        raise _JobArgumentError(f"submit {kind}: the job's arguments after --: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _check_submitted_tune(rest: list[str], storage_flag: str | None, profile
                          ) -> tuple[str, str, tuple[str, str] | None]:
    """Parse and check a tune job's arguments as its workers will; returns (storage, how it was found, the
    job's cache_dir and where it came from, or None for the default)."""
    from deepsports.config import parse_overrides
    from deepsports.tune.checks import resolve_storage
    from deepsports.tune.search_space import load_search_space
    from deepsports.tune.settings import DEFAULT_STORAGE

    parser = _strict(argparse.ArgumentParser(prog="deepsports tune", add_help=False), "tune")
    _add_tune_arguments(parser)
    job = parser.parse_args(rest)
    if "--storage" in rest or any(a.startswith("--storage=") for a in rest):
        storage, source = job.storage, "--storage after --"
    elif storage_flag is not None:
        storage, source = storage_flag, "submit --storage"
    elif profile.env.get("DEEPSPORTS_STUDY_STORAGE"):
        storage, source = profile.env["DEEPSPORTS_STUDY_STORAGE"], f"DEEPSPORTS_STUDY_STORAGE of {profile.source}"
    else:
        storage, source = DEFAULT_STORAGE, "the default: no --storage given"
    job.storage = storage
    if "://" not in storage and not Path(storage).expanduser().is_absolute() and profile.workdir:
        # The job opens it relative to the profile's workdir, known only on the node.
        where = f" (relative to the job's workdir {profile.workdir}; {source})"
        _check_tune_args(job, check_storage=False)
    else:
        _check_tune_args(job, storage_source=source)
        storage, where = resolve_storage(storage, source), f" ({source})"
    space, overrides = load_search_space(job.search_space), parse_overrides(job.overrides)
    for values, origin in ((overrides, "--set cache_dir after --"), (space.fixed, f"fixed: of {space.path}"),
                           (space.base_values, f"the base config of {space.path}")):
        if "cache_dir" in values:
            return storage, where, (str(values["cache_dir"]), origin)
    return storage, where, None


def _check_submitted_config(kind: str, rest: list[str], build_parser: Callable[[], argparse.ArgumentParser]
                            ) -> tuple[str, str] | None:
    """A train/prepare job's arguments build a valid config here before the job is submitted; returns the
    config's cache_dir and where it came from (None when it is the default)."""
    from deepsports.cli.config_args import config_from_args
    from deepsports.config import config_fields

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse keeps the subcommand parsers there
        for name, sub in action.choices.items():
            _strict(sub, name)
    config = config_from_args(_strict(parser, kind).parse_args([kind, *rest]))
    if config.cache_dir == config_fields()["cache_dir"].default:
        return None
    return config.cache_dir, "the job's config"


def register(sub, build_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """Add the study and SLURM subcommands to the ``deepsports`` parser.

    ``build_parser`` makes the whole parser (cli/main.py passes it in, so that this module never imports
    it back): ``submit`` parses a job's arguments with it as the job will.
    """
    from deepsports.tune.settings import DEFAULT_STORAGE, STORAGE_ENV

    p = sub.add_parser("tune", help="run trials of an Optuna study (each a child MLflow run of the study's run)")
    _add_tune_arguments(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("best", help="the best trial of a study: print it, export its config, plot the study")
    p.add_argument("study", help="study name")
    p.add_argument("--storage", default=os.environ.get(STORAGE_ENV, DEFAULT_STORAGE),
                   help=f"Optuna storage of the study [${STORAGE_ENV} or {DEFAULT_STORAGE}]")
    p.add_argument("--out", default=None, help="config file to write [experiments/<study>_best.yaml]")
    p.add_argument("--retrain", action="store_true", help="train the best config again with evaluate=true")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the retraining run")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="with --retrain: register the retrained model as a new version of NAME (tagged with the study, "
                        "trial and metrics); the alias champion moves to it only when its best_val_spearman is higher")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="with --retrain: N seeds as sibling runs under one parent (mean, sd, 95%% interval)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the retraining run")
    p.set_defaults(func=_cmd_best)

    add_status_parser(sub)

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
    p.set_defaults(func=_cmd_submit, build_parser=build_parser)
