"""Attempts of a run (``tests/reliability/resume_worker.py``) as fresh processes forked from one server.

The server imports torch, MLflow and Optuna once; each attempt is a child forked from it, before any of
them ran anything, in a process group of its own (a signal to the group reaches its loader workers, or
both DDP ranks, as ``kill -- -<pgid>`` and SLURM do). It saves each attempt the 4-5 s of CPU those
imports take in a new interpreter; what the attempt computes does not depend on that (the reference
runs start the same way).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

_PRELOAD = ["tests.reliability.resume_worker", "deepsports.train.loop", "deepsports.tune.worker",
            "deepsports.tracking.runs", "deepsports.data", "deepsports.slurm.preemption"]
_lock = threading.Lock()
_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    with _lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
        return _context


def _attempt(argv: list[str], env: dict[str, str], cwd: str, group: int, log_path: str) -> None:
    for _ in range(1000):  # rank 0 may not lead its group yet
        try:
            os.setpgid(0, group)  # 0: a new group led by this process
            break
        except PermissionError:
            time.sleep(0.01)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import sys

    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    from tests.reliability.resume_worker import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, ranks: int = 1,
        timeout: float = 600) -> tuple[list[int], str]:
    """``resume_worker.main(argv)`` in ``ranks`` processes of one new group (rank ``r`` gets ``RANK=r``
    and friends when ``ranks > 1``); returns each rank's exit code (-9: SIGKILL) and the log's tail."""
    ctx = _server()
    procs = []
    port = env.get("MASTER_PORT", "")
    for rank in range(ranks):
        rank_env = dict(env)
        if ranks > 1:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port)
        group = procs[0].pid if procs else 0
        proc = ctx.Process(target=_attempt, args=(argv, rank_env, str(cwd), group, str(log_path)))
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs], log_path.read_text()[-3000:] if log_path.exists() else ""
