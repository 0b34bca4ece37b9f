"""What a SLURM job does once it stopped on a signal: requeue itself, leave the requeue to SLURM, or end.

Every command that trains (``train``, ``train --seeds``, ``tune``, ``prepare``) runs inside
:func:`preemptible`: the stop flag (:class:`deepsports.signals.StopFlag`) is installed, the work runs, it
writes its checkpoint and raises :class:`~deepsports.errors.PreemptedError` when a signal asked it to stop,
and then, inside a SLURM job, :func:`after_stop` decides by the signal and by the job's state as the
controller reports it (``scontrol show job``, with a timeout):

* the **time-limit warning** (the profile's ``signal``, SIGUSR1 by default, ``--signal=B:<sig>@<grace>``):
  the job requeues itself (``scontrol requeue``) and resumes from its checkpoint;
* **SIGTERM at the time limit** (it came without a warning): the job requeues itself too;
* **SIGTERM of a cancel** (``scancel``): nothing; the job ends for good, its trial stays paused;
* **SIGTERM of a requeue** (``scontrol requeue``, preemption with ``PreemptMode=REQUEUE``): nothing;
  SLURM itself starts the task again;
* **SIGTERM because the job step died** (``slurmstepd`` killed: the worker's parent is gone): the job
  requeues itself, which also ends the "ghost" the controller still shows as RUNNING.

docs/preemption.md tells the whole protocol.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from deepsports.errors import PreemptedError
from deepsports.signals import StopFlag, die_with_parent, parent_is_gone, warning_signal
from deepsports.slurm.env import ClusterEnv

__all__ = ["Preemptible", "after_stop", "preemptible", "stop_cause"]


class Preemptible:
    """The stop flag of one command (``requested`` for the training loop) and whether it may requeue the job."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag
        #: False on the ranks of a multi-process run other than rank 0 (one requeue per job).
        self.requeue = True
        self.parent: int | None = None

    def requested(self) -> bool:
        return self.flag.requested()


def _parent_is_slurmstepd() -> bool:
    try:
        with open(f"/proc/{os.getppid()}/comm") as handle:
            return handle.read().strip().startswith("slurmstepd")
    except OSError:
        return False


@contextlib.contextmanager
def preemptible(*, interrupt: bool = False) -> Iterator[Preemptible]:
    """Stop flag -> run -> (checkpoint, :class:`PreemptedError`) -> requeue as :func:`after_stop` decides.

    ``interrupt=True`` (``prepare``, whose every write is resumable): the first signal raises
    PreemptedError at once instead of setting a flag to poll. Inside a SLURM step the process also dies
    with its step daemon (:func:`deepsports.signals.die_with_parent`): SIGTERM at once, SIGKILL 60 s later.
    """
    stop = Preemptible(StopFlag(interrupt=interrupt))
    with stop.flag:
        if ClusterEnv.read().job_id and _parent_is_slurmstepd():
            stop.parent = os.getppid()
            die_with_parent(signal.SIGTERM)
        try:
            if interrupt and stop.flag.requested():  # a signal that came before we started
                raise PreemptedError(f"stopped by {stop.flag.signal_name} before it began")
            yield stop
        except PreemptedError:
            if stop.requeue:
                after_stop(stop)
            raise


def stop_cause(stop: Preemptible, env: ClusterEnv | None = None) -> tuple[str, str]:
    """``(cause, words)`` of a stop inside a SLURM job; cause is one of "warning" (the time-limit warning
    signal), "step-died", "requeued" (by SLURM: scontrol requeue, preemption), "timeout", "cancelled"
    (scancel), "outside" (a SIGTERM not from SLURM) or "unknown" (the controller did not answer).

    While the job ends, ``scontrol show job`` says COMPLETING whatever ended it; a requeue (``scontrol
    requeue``, preemption under ``PreemptMode=REQUEUE``) has raised its ``Restarts`` above the
    ``SLURM_RESTART_COUNT`` this run started with, a time limit shows as ``RunTime`` >= ``TimeLimit``.
    """
    from deepsports.slurm.jobs import SlurmError, job_info
    from deepsports.slurm.profile import time_limit_seconds

    env = env or ClusterEnv.read()
    name = stop.flag.signal_name or "a stop signal"
    if stop.parent is not None and parent_is_gone(stop.parent):
        return "step-died", f"{name}: its job step is gone (slurmstepd died)"
    if stop.flag.signal == warning_signal():
        return "warning", f"{name}, the time-limit warning"
    try:
        info = job_info(env.task_job_id or "")
    except SlurmError as exc:
        return "unknown", f"{name}; the job's state is unknown ({exc})"
    state = info["JobState"]
    if int(info.get("Restarts", "0") or 0) > int(env.restart_count or 0):
        return "requeued", f"{name}: SLURM requeued it (scontrol requeue or preemption; {state})"
    if state == "RUNNING":
        return "outside", f"{name} from outside SLURM (the job is still RUNNING)"
    try:
        run_s = time_limit_seconds(info.get("RunTime", "0"))
        limit_s = time_limit_seconds(info.get("TimeLimit", "UNLIMITED"))
    except ValueError:
        run_s = limit_s = None
    if state == "TIMEOUT" or (run_s is not None and limit_s is not None and run_s >= limit_s):
        return "timeout", f"{name} at its time limit (no warning signal came first)"
    return "cancelled", f"{name}: the job was cancelled (scancel; {state})"


#: Causes after which the job requeues itself (the others end it, or SLURM brings it back by itself).
_REQUEUE_SELF = {"warning", "timeout", "step-died"}


def after_stop(stop: Preemptible) -> str | None:
    """Inside a SLURM job, requeue it when the stop was the time-limit warning, a TIMEOUT or a dead step.

    Prints what was done on stderr; returns the id requeued (None outside SLURM or when not requeued).
    Call it inside the stop flag's block: SLURM's SIGTERM after the requeue must find the handler installed.
    """
    from deepsports.slurm.jobs import SlurmError, requeue_self

    env = ClusterEnv.read()
    job = env.task_job_id
    if job is None:
        return None
    cause, words = stop_cause(stop, env)
    if cause not in _REQUEUE_SELF:
        after = {"requeued": "SLURM starts it again itself",
                 "cancelled": "it ends for good; a paused trial waits for the next worker (deepsports submit tune "
                              "--missing)"}.get(cause, "not requeued")
        print(f"deepsports: SLURM task {job} stopped by {words}: {after}", file=sys.stderr)
        return None
    try:
        requeued = requeue_self()
    except SlurmError as exc:
        print(f"deepsports: warning: SLURM task {job} (stopped by {words}) was not requeued: {exc}", file=sys.stderr)
        return None
    print(f"deepsports: requeued SLURM task {requeued} (stopped by {words})", file=sys.stderr)
    return requeued
