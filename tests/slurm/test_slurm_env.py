"""The one reader of the cluster environment (deepsports.slurm.env), on environments as SLURM and torchrun set them."""

from __future__ import annotations

import pytest

from deepsports.errors import ConfigError
from deepsports.slurm.env import ClusterEnv, Ranks, run_tags

#: An array task's batch step before any requeue (SLURM sets no SLURM_RESTART_COUNT then).
ARRAY_TASK = {"SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2",
              "SLURMD_NODENAME": "node1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "2"}


def test_outside_any_job_nothing_is_known():
    env = ClusterEnv.read({"HOME": "/root"})
    assert env == ClusterEnv()
    assert (env.job_vars(), env.tags(), env.task_job_id, env.worker_id, env.job_label, env.ranks()) == \
        ({}, {}, None, None, "", None)


def test_an_array_task_names_itself_and_counts_restarts_from_zero():
    env = ClusterEnv.read(ARRAY_TASK)
    assert (env.job_id, env.array_job_id, env.array_task_id, env.node) == ("42", "40", "2", "node1")
    assert env.task_job_id == "40_2" and env.worker_id == 2 and env.job_label == "40/2/42"
    assert env.tags() == {"slurm.job_id": "42", "slurm.array_job_id": "40", "slurm.array_task_id": "2",
                          "slurm.node": "node1", "slurm.restart_count": "0"}
    # The run-level tags say only what SLURM set: no restart count before the first requeue.
    assert "slurm.restart_count" not in env.tags(restart_count_default=False)
    requeued = ClusterEnv.read({**ARRAY_TASK, "SLURM_RESTART_COUNT": "3"})
    assert requeued.tags(restart_count_default=False)["slurm.restart_count"] == "3" == requeued.tags()["slurm.restart_count"]


def test_a_plain_job_and_a_step_rank():
    env = ClusterEnv.read({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_ARRAY_TASK_ID": ""})
    assert env.task_job_id == "7" and env.worker_id == 1 and env.job_label == "7"
    assert ClusterEnv.read({"SLURM_JOB_ID": "7", "SLURM_PROCID": "x"}).worker_id is None


def test_rank_layout_torchrun_wins_and_srun_counts_only_in_a_multi_task_step():
    srun = {**ARRAY_TASK, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    assert ClusterEnv.read(srun).ranks() == Ranks(rank=1, world_size=2, local_rank=1, launcher="srun")
    torchrun = {**srun, "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "0"}
    assert ClusterEnv.read(torchrun).ranks() == Ranks(rank=3, world_size=4, local_rank=0, launcher="torchrun")
    # The batch script itself (SLURM_NTASKS=2 but no step of several tasks) is one process.
    assert ClusterEnv.read({**ARRAY_TASK, "SLURM_NTASKS": "2"}).ranks() is None
    assert ClusterEnv.read({**srun, "SLURM_STEP_NUM_TASKS": "1"}).ranks() is None


def test_a_malformed_rank_variable_is_named_when_the_layout_is_asked_for():
    env = ClusterEnv.read({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "first"})
    assert env.tags() == {}  # reading it is not an error; the layout is
    with pytest.raises(ConfigError, match=r"SLURM_LOCALID='first': expected an integer"):
        env.ranks()


def test_read_takes_the_process_environment_and_every_reader_agrees(monkeypatch):
    from deepsports.slurm.jobs import slurm_env, task_job_id
    from deepsports.tracking.runs import environment_tags
    from deepsports.train.distributed import detect
    from deepsports.tune.recovery import task_identity
    from deepsports.tune.study import default_worker_id, worker_label

    for name, value in {**ARRAY_TASK, "SLURM_RESTART_COUNT": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
                        "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = ClusterEnv.read()
    assert (env.master_addr, env.master_port) == ("node1", "29500")
    assert slurm_env() == env.job_vars() and task_job_id() == task_identity() == "40_2"
    assert default_worker_id() == 2 and worker_label().endswith(" slurm 40/2/42")
    assert {k: v for k, v in environment_tags(run_tags()).items() if k.startswith("slurm.")} == env.tags()
    assert (detect().rank, detect().world_size, detect().launcher) == (0, 2, "srun")
