"""The one reader of the cluster environment: what SLURM and the launchers (srun, torchrun) tell a process.

Like submitit's ``JobEnvironment`` and Lightning's ``SLURMEnvironment``: :meth:`ClusterEnv.read` takes
one snapshot of the environment (``os.environ`` unless given), and everything else in DeepSports asks
it instead of reading ``SLURM_*`` itself. Values stay the strings the environment holds; only the rank
layout is parsed, when asked (a malformed rank variable is an error of the launch, not of a tag).
Standard library only, so that every room may import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

from deepsports.errors import ConfigError

#: What a job knows about itself (:meth:`ClusterEnv.job_vars`), and the MLflow tag each is recorded as.
SLURM_TAGS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
              "SLURM_ARRAY_TASK_ID": "slurm.array_task_id", "SLURMD_NODENAME": "slurm.node",
              "SLURM_RESTART_COUNT": "slurm.restart_count"}

#: Field -> environment variable.
_VARS = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
         "node": "SLURMD_NODENAME", "restart_count": "SLURM_RESTART_COUNT", "procid": "SLURM_PROCID",
         "step_num_tasks": "SLURM_STEP_NUM_TASKS", "localid": "SLURM_LOCALID", "world_size": "WORLD_SIZE",
         "rank": "RANK", "local_rank": "LOCAL_RANK", "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}


class Ranks(NamedTuple):
    """This process's place in a multi-process launch."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "srun"


@dataclass(frozen=True)
class ClusterEnv:
    """A snapshot of the cluster environment; every field is the variable's text, ``None`` when unset."""

    job_id: str | None = None            # SLURM_JOB_ID
    array_job_id: str | None = None      # SLURM_ARRAY_JOB_ID
    array_task_id: str | None = None     # SLURM_ARRAY_TASK_ID
    node: str | None = None              # SLURMD_NODENAME
    restart_count: str | None = None     # SLURM_RESTART_COUNT (set by SLURM only after a requeue)
    procid: str | None = None            # SLURM_PROCID: the task's rank in its job step
    step_num_tasks: str | None = None    # SLURM_STEP_NUM_TASKS: tasks of this srun step
    localid: str | None = None           # SLURM_LOCALID: the task's rank on its node
    world_size: str | None = None        # WORLD_SIZE (torchrun)
    rank: str | None = None              # RANK (torchrun)
    local_rank: str | None = None        # LOCAL_RANK (torchrun)
    master_addr: str | None = None       # MASTER_ADDR (the rendezvous; the sbatch template exports it)
    master_port: str | None = None       # MASTER_PORT

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> ClusterEnv:
        env = os.environ if environ is None else environ
        return cls(**{f.name: env.get(_VARS[f.name]) for f in fields(cls)})

    def job_vars(self) -> dict[str, str]:
        """SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURMD_NODENAME, SLURM_RESTART_COUNT of this job.

        Empty outside a job. SLURM sets SLURM_RESTART_COUNT only after a requeue; inside a job it is "0" before.
        """
        by_var = {_VARS[name]: getattr(self, name) for name in _VARS}
        out = {name: by_var[name] for name in SLURM_TAGS if by_var[name]}
        if "SLURM_JOB_ID" in out:
            out.setdefault("SLURM_RESTART_COUNT", "0")
        return out

    def tags(self, *, restart_count_default: bool = True) -> dict[str, str]:
        """The job's MLflow tags (``slurm.job_id``, ...). ``restart_count_default=False``: no
        ``slurm.restart_count`` before the first requeue (the run-level tags say only what SLURM set)."""
        values = self.job_vars()
        if not restart_count_default and not self.restart_count:
            values.pop("SLURM_RESTART_COUNT", None)
        return {SLURM_TAGS[var]: value for var, value in values.items()}

    @property
    def task_job_id(self) -> str | None:
        """The id that names this job or array task alone in scontrol (None outside SLURM)."""
        if self.array_job_id and self.array_task_id:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id or None

    @property
    def worker_id(self) -> int | None:
        """The SLURM array task (or step rank) this process is, if any."""
        for value in (self.array_task_id, self.procid):
            if (value or "").isdigit():
                return int(value)
        return None

    @property
    def job_label(self) -> str:
        """``<array job>/<task>/<job id>`` of the ids that are set ("" outside SLURM)."""
        return "/".join(v for v in (self.array_job_id, self.array_task_id, self.job_id) if v)

    def ranks(self) -> Ranks | None:
        """The rank layout the launcher gave this process (``None`` when launched alone).

        torchrun's variables win. SLURM's are used only inside an ``srun`` step of several tasks
        (``SLURM_STEP_NUM_TASKS``), never from the batch script itself, whose ``SLURM_NTASKS`` counts the
        tasks it *could* start.
        """
        world = _int("WORLD_SIZE", self.world_size)
        if world is not None and world > 1:
            rank, local = _int("RANK", self.rank), _int("LOCAL_RANK", self.local_rank)
            if rank is None:
                raise ConfigError("WORLD_SIZE is set but RANK is not: launch with torchrun (or set both)")
            return Ranks(rank=rank, world_size=world, local_rank=local if local is not None else rank,
                         launcher="torchrun")
        tasks = _int("SLURM_STEP_NUM_TASKS", self.step_num_tasks)
        if tasks is not None and tasks > 1 and self.procid is not None:
            return Ranks(rank=_int("SLURM_PROCID", self.procid) or 0, world_size=tasks,
                         local_rank=_int("SLURM_LOCALID", self.localid) or 0, launcher="srun")
        return None


def run_tags() -> dict[str, str]:
    """The SLURM ids every MLflow run records (``slurm.job_id``, ...: those SLURM set in this job step;
    the restart count only once SLURM set it), for :meth:`deepsports.tracking.runs.RunTracker.start`."""
    return ClusterEnv.read().tags(restart_count_default=False)


def _int(name: str, value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None
