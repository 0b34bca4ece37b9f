"""The ``deepsports`` command line.

Each subcommand parses its arguments, builds the config, calls one library function and maps the
project's exception types to exit codes. Every config key is accepted as ``key=value`` and as the
original ``train.py`` flag ``--key value`` (lists as ``--topology 512 256``), so old job scripts port.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deepsports.cli.config_args import add_config_arguments, config_from_args
from deepsports.errors import ConfigError, DeepSportsError, PreemptedError

if TYPE_CHECKING:
    from deepsports.config import Config

log = logging.getLogger(__name__)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.seeds is not None:
        return _train_seeds(_checked_config(args), args.seeds)
    from deepsports.slurm.preemption import preemptible

    # First, before torch is imported (seconds): a stop signal from now on is kept, not lost.
    with preemptible() as stop:
        config = _checked_config(args)  # a bad value is refused in a blink, not after torch's import
        from deepsports.train.distributed import detect
        from deepsports.train.loop import train
        from deepsports.train.state import TrainHooks

        main_rank = stop.requeue = detect().is_main  # under torchrun/srun only rank 0 requeues and prints
        result = train(config, hooks=TrainHooks(stop_requested=stop.requested))
    if not main_rank:
        return 0
    if result.already_finished:
        print(f"deepsports: run {result.run_id} already finished; nothing trained or logged (its checkpoints: "
              f"{result.checkpoint_dir}; `deepsports evaluate` re-evaluates one)", file=sys.stderr)
    summary = {"run_id": result.run_id, "best_val_spearman": result.best_val_spearman, "best_epoch": result.best_epoch,
               "resumed_from_epoch": result.resumed_from_epoch, "checkpoint_dir": str(result.checkpoint_dir),
               **{f"test_{k}": v for k, v in result.test_metrics.items()}}
    from deepsports.tracking.ui import run_link
    from deepsports.tracking.uris import tracking_uri

    summary["ui"] = run_link(tracking_uri(), result.run_id)  # a local store: served by `deepsports ui`
    print(json.dumps(summary, indent=2))
    return 0


def _checked_config(args: argparse.Namespace, *, checkpoint: bool = True):
    """The command line's config, its cache and checkpoint folders writable (before any run exists)."""
    from deepsports.config import check_installed, check_writable_dirs
    from deepsports.tracking.uris import check_tracking_uri

    config = config_from_args(args)
    if checkpoint:
        check_installed(config)  # the soft-Spearman loss without torchsort: one line, no run created
        check_tracking_uri()
        check_writable_dirs(config)
    else:
        check_writable_dirs(cache_dir=config.cache_dir)
    return config


def _train_seeds(config: Config, n_seeds: int) -> int:
    from deepsports.slurm.preemption import preemptible
    from deepsports.train.seeds import train_seeds
    from deepsports.train.state import TrainHooks

    with preemptible() as stop:
        result = train_seeds(config, n_seeds, hooks=TrainHooks(stop_requested=stop.requested))
    print(json.dumps({"parent_run_id": result.run_id, "seeds": result.seeds, "run_ids": result.run_ids,
                      **result.test_metrics}, indent=2))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from deepsports.data import prepare_from_config
    from deepsports.slurm.preemption import preemptible

    config = _checked_config(args, checkpoint=False)
    # prepare is resumable (every clip is written to a temporary name, then renamed), so a stop signal
    # stops it at once; under SLURM it requeues itself on the time-limit warning and continues later.
    with preemptible(interrupt=True):
        index = prepare_from_config(config, progress=not args.quiet, skip_bad=args.skip_bad)
    print(index.summary() if hasattr(index, "summary") else index)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    if args.rehearsal:
        return _cmd_rehearsal(args)
    from deepsports.data.synth import generate_synthetic_dataset

    out = generate_synthetic_dataset(Path(args.out), n_clips=args.clips, seed=args.seed, progress=not args.quiet)
    print(f"synthetic MTL-AQA-layout dataset in {out.root}\n  annotations: {out.annotation_path}\n"
          f"  train split: {out.train_path}\n  test split:  {out.test_path}\n"
          f"train on it with: deepsports train dataset=mtl_aqa root_dir={out.root} annotation_path={out.annotation_path} "
          f"train_path={out.train_path} test_path={out.test_path}")
    return 0


def _cmd_rehearsal(args: argparse.Namespace) -> int:
    from deepsports.config import parse_value
    from deepsports.data.rehearsal import generate_rehearsal

    if args.clips != 600:
        raise ConfigError(f"--clips={args.clips} does not apply to --rehearsal: the real annotations fix the clips")
    videos = None if args.videos is None else [int(v) for v in parse_value("videos", " ".join(args.videos))]
    report = generate_rehearsal(Path(args.out), annotation_path=args.annotation_path, train_path=args.train_path,
                                test_path=args.test_path, videos=videos, clips_per_video=args.clips_per_video,
                                seed=args.seed, workers=args.workers,
                                progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True))
    root = report.root
    print(f"{report.summary()}\ntrain on it with: deepsports train dataset=mtl_aqa root_dir={root} "
          f"annotation_path={root / 'final_annotations_dict.pkl'} train_path={root / 'train_split_0.pkl'} "
          f"test_path={root / 'test_split_0.pkl'}" + (f" videos={','.join(f'{v:02d}' for v in videos)}" if videos else ""))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(config.to_yaml(), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from deepsports.cli.demo import run_demo

    return run_demo(epochs=args.epochs, params=args.params)


#: Every exit status of ``deepsports`` (``tests/cli/test_new_user.py`` checks each error type has its line).
EXIT_CODES = (
    (0, "success"),
    (1, "an unexpected error (a bug: please report the traceback)"),
    (2, "bad input: a config value, flag, file name, search space, study name or storage, a folder that cannot be "
        "written or does not exist (nothing was started)"),
    (3, "data: annotations, splits, videos or the clip cache missing or malformed"),
    (4, "checkpoint: unreadable, unsafe, or not fitting the model"),
    (5, "training failed: non-finite loss, out of memory, a data-loader worker died"),
    (6, "storage: the MLflow store or the study storage cannot be opened or lacks what was asked for, or a full "
        "disk / quota (the message names the path, the free space and what was written)"),
    (7, "SLURM: sbatch/scontrol missing or refused the request"),
    (8, "the checkpoint_dir is in use by another live process (named: pid, host, since)"),
    (75, "stopped by SIGUSR1/SIGTERM after saving a checkpoint: run the same command again to resume "
         "(under SLURM the job requeued itself on its time-limit warning; SLURM requeues it after a preemption; "
         "a `scancel` ends it)"),
    (130, "interrupted by Ctrl-C"),
)


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from deepsports import __version__

    try:
        return version("deepsports")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepsports",
                                     description="DeepSports: train, tune and track AQA models of diving videos.",
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"deepsports {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one configuration, tracked in MLflow")
    add_config_arguments(p)
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train seeds seed..seed+N-1 as sibling runs under one parent that logs the mean, sd and "
                        "95%% interval of every test metric")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("prepare", help="decode the videos once into the clip cache (resumable)")
    add_config_arguments(p)
    p.add_argument("--skip-bad", action="store_true", help="record corrupt videos/clips and go on")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("synth", help="write the synthetic diving dataset in the MTL-AQA layout")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--clips", type=int, default=600, help="number of clips [600]")
    p.add_argument("--seed", type=int, default=0, help="seed [0]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    rehearsal = p.add_argument_group("full-scale rehearsal (--rehearsal): the real MTL-AQA files over synthetic videos")
    rehearsal.add_argument("--rehearsal", action="store_true",
                           help="write whole videos at the real MTL-AQA frame ranges (2.36 M frames; resumable)")
    rehearsal.add_argument("--videos", nargs="+", default=None, metavar="NN", help="only these videos, e.g. 13 14 [all]")
    rehearsal.add_argument("--clips-per-video", type=int, default=None, metavar="N",
                           help="keep each video's first N clips (shorter videos; the pickles then hold those clips)")
    rehearsal.add_argument("--annotation-path", default=None, help="annotations pickle [the packaged MTL-AQA file]")
    rehearsal.add_argument("--train-path", default=None, help="train split pickle [the packaged MTL-AQA file]")
    rehearsal.add_argument("--test-path", default=None, help="test split pickle [the packaged MTL-AQA file]")
    rehearsal.add_argument("--workers", type=int, default=None, help="encoding processes [one per usable CPU]")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("config", help="print the resolved config as YAML")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="train through the MLflow Project on synthetic data and say where to look")
    p.add_argument("--epochs", type=int, default=10, help="epochs [10]")
    p.add_argument("-P", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MLproject parameters, e.g. -P synth_clips=300")
    p.set_defaults(func=_cmd_demo)

    for register in _extension_registrars():
        register(sub, build_parser)
    return parser


def _extension_registrars():
    """Subcommands owned by the study and SLURM modules (each module adds its own parser)."""
    from deepsports.cli import evaluate as cli_evaluate
    from deepsports.cli import studies as cli_studies
    from deepsports.cli import ui as cli_ui

    return [cli_studies.register, cli_evaluate.register, cli_ui.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    all_args = list(sys.argv[1:] if argv is None else argv)
    # `deepsports submit KIND [options] -- ARGS...`: argparse mishandles `--` below a subparser.
    passthrough: list[str] | None = None
    if all_args[:1] == ["submit"] and "--" in all_args:
        cut = all_args.index("--")
        all_args, passthrough = all_args[:cut], all_args[cut + 1:]
    args = parser.parse_args(all_args)
    if passthrough is not None:
        args.args = list(args.args) + passthrough
    args.argv = all_args
    try:
        from deepsports.tracking.credentials import load_credentials

        load_credentials()  # $DEEPSPORTS_MLFLOW_CREDENTIALS: the tracking server's user and password
        return int(args.func(args) or 0)
    except PreemptedError as exc:
        print(f"deepsports: interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except DeepSportsError as exc:
        print(f"deepsports: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("deepsports: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
