"""Data-parallel training: 2 gloo processes on the CPU give the single-process result with the same global batch."""

from __future__ import annotations

import os
import queue
import sys

import mlflow
import numpy as np
import pytest
import torch

from deepsports.config import build_config
from deepsports.errors import ConfigError
from deepsports.train.distributed import (
    SINGLE,
    DistEnv,
    GlobalBatchModel,
    ShardedBatchSampler,
    detect,
    setup,
    shard_sizes,
    steps_per_epoch,
    wrap_ddp,
)
from tests.e2e_helpers import as_args, deepsports_cmd, free_port, run_checked, subprocess_env, tiny_overrides

DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID",
             "SLURM_NTASKS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- sharding and launcher detection ---

@pytest.mark.parametrize("n,world,expected", [(7, 2, [4, 3]), (8, 2, [4, 4]), (1, 2, [1, 0]), (5, 1, [5]),
                                              (10, 4, [3, 3, 2, 2])])
def test_shard_sizes(n, world, expected):
    assert shard_sizes(n, world) == expected


@pytest.mark.parametrize("size,batch,world,steps", [(10, 4, 1, 3), (9, 4, 1, 2), (9, 4, 2, 2), (11, 4, 2, 3),
                                                    (11, 4, 4, 2), (12, 4, 4, 3)])
def test_steps_per_epoch_keeps_a_last_batch_of_two_clips_and_one_per_rank(size, batch, world, steps):
    assert steps_per_epoch(size, batch, world) == steps
    env = DistEnv(rank=world - 1, world_size=world)
    assert len(list(ShardedBatchSampler(range(size), batch, env, train=True))) == steps


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_shards_are_each_global_batch_in_order(world):
    order = list(np.random.default_rng(0).permutation(23))
    per_rank = [list(ShardedBatchSampler(order, 6, DistEnv(rank=r, world_size=world), train=True))
                for r in range(world)]
    single = list(ShardedBatchSampler(order, 6, SINGLE, train=True))
    assert len({len(p) for p in per_rank}) == 1  # every rank runs the same number of steps
    for step, whole in enumerate(single):
        assert sum((p[step] for p in per_rank), []) == whole
    assert sum(single, []) == order[:23 - 23 % 6 if 23 % 6 < max(2, world) else 23]


def test_evaluation_keeps_every_row_and_pads_an_empty_shard():
    env0, env1 = DistEnv(rank=0, world_size=2), DistEnv(rank=1, world_size=2)
    s0, s1 = ShardedBatchSampler(range(9), 4, env0, train=False), ShardedBatchSampler(range(9), 4, env1, train=False)
    assert list(s0) == [[0, 1], [4, 5], [8]]
    assert list(s1) == [[2, 3], [6, 7], [8]]  # rank 1 has no real row in the last batch: one repeat, ignored
    assert s1.global_sizes[-1] == [1, 0]


def test_detect_reads_torchrun_and_srun_variables(clean_env):
    assert detect() == SINGLE
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("RANK", "3")
    clean_env.setenv("LOCAL_RANK", "1")
    assert (detect().rank, detect().world_size, detect().local_rank, detect().launcher) == (3, 4, 1, "torchrun")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        clean_env.delenv(name)
    # An sbatch script of 2 tasks is one process until srun starts the tasks.
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_PROCID", "0")
    assert detect() == SINGLE
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_LOCALID", "1")
    assert (detect().rank, detect().world_size, detect().launcher) == (1, 2, "srun")


def test_bad_launcher_variables_are_clear_errors(clean_env):
    clean_env.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        detect()
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK is not"):
        detect()
    clean_env.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        setup(use_cuda=False, backend="nccl")
    clean_env.delenv("WORLD_SIZE")
    clean_env.delenv("RANK")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        setup(use_cuda=False)


# --- one step: gathered head + scaled backbone gradients == one process ---
# In float64: the two processes sum the same terms in another order (all-reduce of shard gradients), and in
# float32 that reordering alone moved a gradient by 4e-6 on a loaded machine (issue #13). In float64 the
# rounding of a sum of n terms is at most n * 2.2e-16 of the sum of their magnitudes; n is a few thousand
# here and no term exceeds the largest gradient entry by much, so differences stay below ~1e-12 of the
# largest gradient entry of the model (not of each tensor: some, e.g. the bias before a batch norm, are
# zero up to rounding). GRAD_RTOL leaves a 100x margin; a real mistake (a missing 1/world_size, a wrong
# shard) is off by a sizeable fraction of the gradients.
GRAD_RTOL = 1e-10

STEP_CONFIG = {"backbone": "tiny", "frame_num": 4, "spatial_size": 32, "patch_size": 16, "embed_dim": 32,
               "topology": "32,16", "dropout": "0.3,0.3", "feature_norm": "batchnorm", "loss_spcoef_weight": 1.0}
STEP_BATCH = 7  # uneven shards: 4 + 3


def _step_data():
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(STEP_BATCH, 3, 4, 32, 32, generator=generator)
    return video, torch.rand(STEP_BATCH, 2, generator=generator) + 0.5


def _one_step(env: DistEnv) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    from deepsports.model import build_model
    from deepsports.train.distributed import gather_rows
    from deepsports.train.losses import aqa_loss

    config = build_config(STEP_CONFIG)
    torch.manual_seed(0)  # same init and the same head-dropout masks on every rank
    model = build_model(config).model.double()
    video, target = (t.double() for t in _step_data())
    sizes = shard_sizes(STEP_BATCH, env.world_size)
    start = sum(sizes[:env.rank])
    net = wrap_ddp(GlobalBatchModel(model, env), env, torch.device("cpu"))
    out = net(video[start:start + sizes[env.rank]], sizes)
    loss, _ = aqa_loss(out, gather_rows(target[start:start + sizes[env.rank]], sizes, env),
                       config.loss_mse_weight, config.loss_spcoef_weight)
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, model.feature_norm.running_mean.numpy().copy()


def _step_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results.put((rank, _one_step(DistEnv(rank=rank, world_size=2, backend="gloo"))))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_compute_the_single_process_loss_and_gradients():
    torch.set_num_threads(1)
    loss, grads, running_mean = _one_step(SINGLE)
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_step_worker, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = dict(results.get(timeout=180) for _ in procs)
    except queue.Empty:
        pytest.fail("the two gloo processes did not report within 180 s")
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert set(grads) and len(grads) > 50  # backbone, feature norm and head all get gradients
    for rank in (0, 1):
        rank_loss, rank_grads, rank_mean = got[rank]
        assert rank_loss == pytest.approx(loss, rel=GRAD_RTOL)
        assert set(rank_grads) == set(grads)
        scale = max(float(np.abs(grad).max()) for grad in grads.values())
        for name, grad in grads.items():  # DDP averaged: every rank holds the full-batch gradient
            assert grad.dtype == np.float64
            np.testing.assert_allclose(rank_grads[name], grad, rtol=0, atol=GRAD_RTOL * scale, err_msg=name)
        # Batch statistics of the whole batch.
        np.testing.assert_allclose(rank_mean, running_mean, rtol=0, atol=GRAD_RTOL * float(np.abs(running_mean).max()))


# --- end to end: torchrun -m deepsports train ---

def _runs(uri: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("deepsports")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tracking_uri, store_uri,
                                                                             tiny_cache_dir):
    assert store_uri == tracking_uri  # the store tracking_uri names, already migrated
    # SGD: Adam would turn float rounding in near-zero gradients into full-size steps and hide the comparison.
    values = tiny_overrides(tmp_path, cache_dir=tiny_cache_dir, batch_size=5, optimizer="SGD", momentum=0.9,
                            learning_rate=1e-2, epochs=2, evaluate="true")
    env = subprocess_env(tracking_uri, OMP_NUM_THREADS="1")
    run_checked(deepsports_cmd("train", *as_args(values), "run_name=single",
                               f"checkpoint_dir={tmp_path / 'single'}"), env, cwd=tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "deepsports"]
    proc = run_checked([*torchrun, "train", *as_args(values), "run_name=ddp", f"checkpoint_dir={tmp_path / 'ddp'}"],
                       env, cwd=tmp_path)
    assert proc.stdout.count('"run_id"') == 1  # only rank 0 prints the summary

    runs = _runs(tracking_uri)
    assert sorted(runs) == ["ddp", "single"]  # rank 1 made no run of its own
    single, ddp = runs["single"], runs["ddp"]
    assert ddp.info.status == "FINISHED"
    assert ddp.data.tags["deepsports.world_size"] == "2"
    differ = {k for k in single.data.params if ddp.data.params.get(k) != single.data.params[k]}
    assert differ == {"run_name"}  # checkpoint_dir differs too, but paths are tags (deepsports.config.*), not params
    for key in ("train_loss", "val_loss", "val_rel_l2", "learning_rate"):
        want, got = _history(tracking_uri, single.info.run_id, key), _history(tracking_uri, ddp.info.run_id, key)
        assert [s for s, _ in got] == [1, 2]  # each epoch logged once
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4, err_msg=key)
    assert _history(tracking_uri, ddp.info.run_id, "val_spearman") == \
        _history(tracking_uri, single.info.run_id, "val_spearman")
    for key in ("test_mse", "test_rel_l2"):
        assert ddp.data.metrics[key] == pytest.approx(single.data.metrics[key], rel=1e-4)
    assert ddp.data.metrics["test_spearman"] == pytest.approx(single.data.metrics["test_spearman"], abs=1e-9)

    # Rank 0 alone wrote the checkpoints: the same files as one process, holding the same weights.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single").iterdir())
    want = torch.load(tmp_path / "single" / "best.pt", weights_only=True)["model"]
    got = torch.load(tmp_path / "ddp" / "best.pt", weights_only=True)["model"]
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-3, atol=1e-4, msg=name)

    # A DDP checkpoint is an ordinary one: one process resumes it into the same MLflow run.
    run_checked(deepsports_cmd("train", *as_args({**values, "epochs": "3"}), "run_name=ddp",
                               f"checkpoint_dir={tmp_path / 'ddp'}"), env, cwd=tmp_path)
    resumed = mlflow.MlflowClient(tracking_uri).get_run(ddp.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert [s for s, _ in _history(tracking_uri, ddp.info.run_id, "train_loss")] == [1, 2, 3]
    assert sorted(_runs(tracking_uri)) == ["ddp", "single"]


def test_a_global_batch_smaller_than_the_process_count_is_refused(tmp_path, tracking_uri, tiny_cache_dir,
                                                                 clean_env):
    from deepsports.train.loop import train

    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("RANK", "0")
    # Refused before this process waits for the three others (which never come here).
    config = build_config({**tiny_overrides(tmp_path, cache_dir=tiny_cache_dir), "batch_size": "2"})
    with pytest.raises(ConfigError, match="batch_size=2 is the global batch"):
        train(config)


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_and_the_run_resumes(tmp_path, tracking_uri, store_uri,
                                                                         tiny_cache_dir):
    """SIGUSR1 reaches rank 1 alone: both ranks stop at the same step, rank 0 checkpoints and marks the
    run interrupted; the same command then resumes it into the same MLflow run, each epoch logged once."""
    import signal
    import subprocess

    import psutil

    from tests.e2e_helpers import wait_for

    epochs = 5  # the stop lands after the first epoch is logged; the later ones leave a wide margin
    values = tiny_overrides(tmp_path, cache_dir=tiny_cache_dir, batch_size=5, epochs=epochs)
    env = subprocess_env(tracking_uri, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "deepsports", "train",
               *as_args(values), "run_name=ddp", f"checkpoint_dir={tmp_path / 'ckpt'}"]
    client = mlflow.MlflowClient(tracking_uri)

    def first_epoch_logged():
        runs = _runs(tracking_uri) if client.get_experiment_by_name("deepsports") else {}
        return "ddp" in runs and client.get_metric_history(runs["ddp"].info.run_id, "val_spearman")

    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(first_epoch_logged, timeout=240, what="the first epoch of the DDP run")
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output
    run = _runs(tracking_uri)["ddp"]
    assert run.info.status == "KILLED" and run.data.tags.get("deepsports.interrupted") == "true", output[-3000:]
    stopped_after = len(client.get_metric_history(run.info.run_id, "val_spearman"))
    assert 1 <= stopped_after < epochs
    assert "stop requested" in output, output[-3000:]

    resumed = run_checked(command[:10] + [str(free_port())] + command[11:], env, cwd=tmp_path)
    assert resumed.stdout.count('"run_id"') == 1
    final = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id)
    assert sorted(_runs(tracking_uri)) == ["ddp"]  # the same run, not a second one
    assert final.info.status == "FINISHED" and final.data.tags["deepsports.resumes"] == "1"
    for key in ("val_spearman", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, epochs + 1))
