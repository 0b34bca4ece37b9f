"""``python -m tests.slurm.fault_worker TUNE-ARGS...``: a ``deepsports tune`` worker in which the first new
trial numbered ``$FAULT_FROM`` or more (not a retry, not a resume; one in the whole study, whichever
worker starts it: the file ``$FAULT_MARKER`` says it happened) runs out of memory at its second step
(``train``'s fault hook, as in tests/reliability/test_training_faults.py). Everything else is the CLI's own path: its parser, the
stop flag and what a stopped SLURM task does (deepsports.slurm.preemption) and its exit codes."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from deepsports.cli import studies
from deepsports.cli.main import build_parser
from deepsports.errors import DeepSportsError, PreemptedError
from deepsports.slurm.preemption import preemptible
from deepsports.train.loop import train
from deepsports.tune.worker import tune


def _first_fault() -> bool:
    try:
        os.close(os.open(os.environ["FAULT_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _train(config, **kwargs):
    def out_of_memory(where: str, step: int) -> None:
        if where == "step" and step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fault hook)")
    tags = kwargs["tags"]
    faulty = ("optuna.retry_of" not in tags and "deepsports.resumed_from" not in tags
              and int(tags["optuna.trial_number"]) >= int(os.environ["FAULT_FROM"]) and _first_fault())
    hooks = dataclasses.replace(kwargs.pop("hooks"), fault_hook=out_of_memory if faulty else None)
    return train(config, hooks=hooks, **kwargs)


def main() -> int:
    args = build_parser().parse_args(["tune", *sys.argv[1:]])
    try:
        with preemptible() as stop:
            tune(studies._tune_settings(args), stop_requested=stop.requested, train_fn=_train)
    except PreemptedError as exc:
        print(f"deepsports: interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except DeepSportsError as exc:
        print(f"deepsports: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
