"""``python -m tests.slurm.fault_worker TUNE-ARGS...``: a ``deepsports tune`` worker in which the first new
trial numbered ``$FAULT_FROM`` or more (not a retry, not a resume; one in the whole study, whichever
worker starts it: the file ``$FAULT_MARKER`` says it happened) runs out of memory at its second step
(``train``'s fault hook, as in tests/reliability/test_training_faults.py). Everything else is the CLI's own
path (``deepsports.cli.main.main``): its parser and checks, the stop flag and what a stopped SLURM task does
(deepsports.slurm.preemption), the summary and the exit codes. Only the training function that the tune
worker imports when it starts is wrapped."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

import deepsports.train.loop
from deepsports.cli.main import main

_train_unwrapped = deepsports.train.loop.train


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
    return _train_unwrapped(config, hooks=hooks, **kwargs)


if __name__ == "__main__":
    deepsports.train.loop.train = _train  # deepsports.tune.worker.tune imports it when it starts
    sys.exit(main(["tune", *sys.argv[1:]]))
