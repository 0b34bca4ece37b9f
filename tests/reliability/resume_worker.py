"""One attempt at a training run, stopped at a chosen moment (see tests/reliability/test_exact_resume.py).

``python -m tests.reliability.resume_worker STOP key=value...``

``STOP`` is ``-`` (run to the end) or ``WHERE:N:SIGNAL``: at the ``N``-th call of ``train``'s fault hook
at ``WHERE`` in this attempt (``step``, ``validate``, ``checkpoint``, ``checkpoint_written``, ``log``,
``final``) rank 0 sends ``SIGNAL`` (``TERM``, ``USR1`` or ``KILL``) to its whole process group, as SLURM
and ``kill -- -<pgid>`` do: the loader workers and the other DDP rank get it too. Otherwise the attempt
runs as ``deepsports train`` does (the stop flag installed first, exit 75 after a stop); the summary
goes to stdout as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(argv: list[str]) -> int:
    """``STOP key=value...`` trains one run; ``STOP --tune SETTINGS_JSON`` runs one study worker
    (:class:`~deepsports.tune.settings.TuneSettings` fields), the fault hook in every trial it trains."""
    from deepsports.config import build_config
    from deepsports.errors import PreemptedError
    from deepsports.slurm.preemption import preemptible

    stop = argv[0]
    with preemptible() as flag:  # as `deepsports train` and `tune` do
        from deepsports.train.loop import train
        from deepsports.train.state import TrainHooks

        calls: dict[str, int] = {}

        def fault(where: str, _index: int) -> None:
            if stop == "-" or os.environ.get("RANK", "0") != "0":
                return
            at, nth, name = stop.split(":")
            calls[where] = calls.get(where, 0) + 1
            if where == at and calls[where] == int(nth):
                os.killpg(os.getpgrp(), getattr(signal, f"SIG{name}"))

        try:
            if argv[1] == "--tune":
                import dataclasses

                from deepsports.tune.settings import TuneSettings
                from deepsports.tune.worker import tune

                def train_with_fault(config, *, hooks, **kwargs):
                    return train(config, hooks=dataclasses.replace(hooks, fault_hook=fault), **kwargs)

                summary = tune(TuneSettings(**json.loads(argv[2])), stop_requested=flag.requested,
                               train_fn=train_with_fault)
                print(json.dumps({"best_number": summary.best_number, "best_value": summary.best_value}))
                return 0
            result = train(build_config(dict(arg.split("=", 1) for arg in argv[1:])),
                           hooks=TrainHooks(stop_requested=flag.requested, fault_hook=fault))
        except PreemptedError as exc:
            print(f"interrupted: {exc}", file=sys.stderr)
            return exc.exit_code
    print(json.dumps({"run_id": result.run_id, "best_epoch": result.best_epoch,
                      "already_finished": result.already_finished,
                      "test_metrics": result.test_metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
