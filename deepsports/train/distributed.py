"""Data-parallel training over several processes (``torchrun`` or ``srun``) with the same maths as one process.

``batch_size`` stays the *global* batch: each of the ``W`` processes takes a contiguous shard of every
batch (sizes differ by at most one clip) and runs the backbone on it. The backbone features of the
shards are then gathered, so every process runs the scoring head, the feature normalisation and the
loss on the whole batch, exactly as one process would. This matters for AQA: the loss holds a
Spearman term over the batch and ``feature_norm: batchnorm`` takes statistics over the batch; neither
is an average of per-shard values, so plain per-shard DDP would optimise a different objective.

Gradients: every process computes the same global loss ``L``. Its head gradients are the full
``dL/dθ`` on every rank; its backbone gradients only flow through its own shard's features, and are
scaled by ``W`` on the way back, so DDP's average over ranks gives ``dL/dθ`` for the backbone too.

Only rank 0 talks to MLflow and writes checkpoints; every rank reads the checkpoint on resume.
Launchers: ``torchrun --nproc_per_node N`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; an ``srun`` job
step of several tasks sets ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID`` (the sbatch
template exports ``MASTER_ADDR``/``MASTER_PORT``). Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from deepsports.errors import ConfigError
from deepsports.slurm.env import ClusterEnv

log = logging.getLogger(__name__)

#: How long a rank waits in a collective for the others (a crashed peer ends the job instead of hanging).
DEFAULT_TIMEOUT_MIN = 30


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``world_size == 1`` is plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    launcher: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def detect() -> DistEnv:
    """The rank layout the launcher gave this process (``SINGLE`` when launched alone); see
    :meth:`deepsports.slurm.env.ClusterEnv.ranks` for which variables count."""
    ranks = ClusterEnv.read().ranks()
    if ranks is None:
        return SINGLE
    return DistEnv(rank=ranks.rank, world_size=ranks.world_size, local_rank=ranks.local_rank, launcher=ranks.launcher)


def setup(use_cuda: bool, backend: str = "auto") -> DistEnv:
    """Join the process group the launcher describes; returns ``SINGLE`` when launched alone.

    ``use_cuda``: each rank takes ``cuda:LOCAL_RANK``. ``backend``: ``auto`` (NCCL with CUDA, else
    gloo), ``nccl`` or ``gloo``.
    """
    env = detect()
    if not env.enabled:
        return SINGLE
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ConfigError("dist_backend=nccl needs CUDA devices; use gloo (or auto) to train on CPUs")
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {env.rank} has LOCAL_RANK={env.local_rank} but this node has "
                              f"{torch.cuda.device_count()} CUDA devices: start at most one process per GPU")
        torch.cuda.set_device(env.local_rank)
    if env.launcher == "srun":
        cluster = ClusterEnv.read()
        for name, value in (("MASTER_ADDR", cluster.master_addr), ("MASTER_PORT", cluster.master_port)):
            if not value:
                raise ConfigError(f"{name} is not set: an srun-launched run needs MASTER_ADDR and MASTER_PORT "
                                  f"(slurm/templates/train.sbatch exports them)")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN))
    env = DistEnv(env.rank, env.world_size, env.local_rank, backend, env.launcher)
    log.info("rank %d of %d (%s, local rank %d, backend %s)", env.rank, env.world_size, env.launcher,
             env.local_rank, backend)
    return env


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


# --- collectives that degrade to no-ops in one process ---

def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(env: DistEnv, obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(env: DistEnv, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a preemption signal seen by one task)."""
    if not env.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --- sharding ---

def shard_sizes(n: int, world: int) -> list[int]:
    """Contiguous shard sizes of ``n`` rows over ``world`` ranks (the first ``n % world`` get one more)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def steps_per_epoch(dataset_size: int, batch_size: int, world: int = 1) -> int:
    """Training batches per epoch: the last, smaller batch is kept when it holds at least two clips
    (a batch Spearman needs two) and at least one per rank."""
    full, rest = divmod(dataset_size, batch_size)
    return full + (1 if rest >= max(2, world) else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's part of each global batch of ``indices`` (already in epoch order).

    ``train=True`` drops a last batch smaller than ``steps_per_epoch`` allows. Evaluation keeps
    every row: a rank whose share of a small last batch is empty gets one repeated row, which the
    gather ignores (``global_sizes`` says how many rows of each rank are real).
    """

    def __init__(self, indices: Sequence[int], batch_size: int, env: DistEnv = SINGLE, train: bool = True):
        self.env = env
        batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
        if train and batches and len(batches[-1]) < batch_size and len(batches[-1]) < max(2, env.world_size):
            batches.pop()
        self.batches = batches
        self.global_sizes = [shard_sizes(len(b), env.world_size) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        for batch, sizes in zip(self.batches, self.global_sizes):
            start = sum(sizes[:self.env.rank])
            mine = batch[start:start + sizes[self.env.rank]]
            yield mine or batch[:1]

    def __len__(self) -> int:
        return len(self.batches)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def gather_rows(tensor: torch.Tensor, sizes: Sequence[int], env: DistEnv, grad: bool = False) -> torch.Tensor:
    """Concatenate every rank's first ``sizes[rank]`` rows of ``tensor``, in rank order.

    With ``grad`` the local rows keep their autograd history (scaled by the world size, see the module
    docstring); the other ranks' rows are constants.
    """
    local = tensor[:sizes[env.rank]]
    if not env.enabled:
        return local
    pad = max(sizes)
    wire_dtype = torch.float32 if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.dtype
    buf = tensor.new_zeros((pad, *tensor.shape[1:]), dtype=wire_dtype)
    buf[:len(local)] = local.detach().to(wire_dtype)
    received = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(received, buf)
    parts = [received[r][:n].to(tensor.dtype) for r, n in enumerate(sizes)]
    parts[env.rank] = _ScaleGrad.apply(local, float(env.world_size)) if grad else local
    return torch.cat(parts)


class GlobalBatchModel(nn.Module):
    """``(shard video, global sizes) -> outputs for the whole global batch`` (see the module docstring).

    Wraps an :class:`~deepsports.model.aqa.AQAModel`; in one process it is the model itself.
    """

    def __init__(self, model: nn.Module, env: DistEnv = SINGLE):
        super().__init__()
        self.model, self.env = model, env

    def forward(self, video: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        features = self.model.features(video)
        return self.model.score(gather_rows(features, sizes, self.env, grad=torch.is_grad_enabled()))


def wrap_ddp(model: GlobalBatchModel, env: DistEnv, device: torch.device,
             find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (returned unchanged in one process)."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (BatchNorm running statistics) are identical on every rank: the head sees the same batch.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                   find_unused_parameters=find_unused_parameters)
