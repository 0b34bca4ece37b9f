"""``deepsports evaluate RUN_ID|CHECKPOINT``: evaluate a checkpoint again as a linked MLflow run."""

from __future__ import annotations

import argparse
import json


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from deepsports.config import parse_overrides
    from deepsports.tracking.uris import check_tracking_uri

    check_tracking_uri()  # in a blink, before torch and MLflow load
    overrides = parse_overrides(args.overrides)
    from deepsports.train.checkpoint_eval import check_source_form, evaluate

    check_source_form(args.source)
    result = evaluate(args.source, split=args.split, overrides=overrides,
                      n_resamples=args.resamples)
    print(json.dumps({"run_id": result.run_id, "source_run_id": result.source_run_id,
                      "checkpoint": str(result.checkpoint), "split": result.split, "epoch": result.epoch,
                      **{f"{result.split}_{k}": v for k, v in result.metrics.items()},
                      "differs_from_logged": result.differs_from_logged}, indent=2))
    return 0


def register(sub, build_parser=None) -> None:
    """Add ``evaluate`` to the ``deepsports`` parser (``build_parser``: the registrar signature; unused)."""
    p = sub.add_parser("evaluate", help="evaluate a run's checkpoint again (both protocols, intervals, groups) "
                                        "as a new MLflow run linked to it")
    p.add_argument("source", metavar="RUN_ID|CHECKPOINT|MODEL_URI",
                   help="an MLflow run id (its checkpoints/best.pt), a checkpoint file, a checkpoint directory, or a "
                        "registered model: models:/NAME@champion, models:/NAME/VERSION (its run's checkpoint)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="split to evaluate [test]")
    p.add_argument("--resamples", type=int, default=None,
                   help="bootstrap resamples of the intervals [as training: the run's deepsports.bootstrap tag]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="where the data is or how to run (e.g. --set num_workers=4 --set root_dir=/data/mtl): "
                        "num_workers, gpu, cache_dir, root_dir, annotation_path, train_path, test_path, batch_size")
    p.set_defaults(func=_cmd_evaluate)
