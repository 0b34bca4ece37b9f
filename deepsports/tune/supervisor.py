"""``deepsports tune --workers N`` on one machine: this process starts N workers and plays the
scheduler's part for them (restarts a worker stopped alone, as SLURM requeues a task; forwards the
signals it gets to all of them). Standard library only: the workers import torch, this process never.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from deepsports.errors import PreemptedError
from deepsports.signals import warning_signal
from deepsports.tune.settings import WORKER_GROUP_ENV


def run_local_workers(argv: list[str], workers: int) -> int:
    """``deepsports tune ... --workers N`` (``argv``): N processes of this same command, each one worker
    (worker ids 0..N-1); returns the exit code for all of them.

    This process plays the scheduler's part: a worker that was stopped alone (SIGUSR1/SIGTERM sent to
    its pid; it paused its trial and exited 75) is started again with the same worker id, as SLURM
    requeues a task, and resumes the paused trial. A signal sent to this process goes to every worker
    and nobody restarts.
    """
    base = _strip_option(argv, "--workers")
    cores = os.cpu_count() or 1
    threads = str(max(1, cores // workers))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
    env[WORKER_GROUP_ENV] = str(os.getpid())  # worker identities: unique per process, kept by a restart
    env.pop("MLFLOW_RUN_ID", None)  # the project run belongs to this parent process

    def start(worker_id: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "deepsports.cli", *base, "--worker-id", str(worker_id),
                                 "--under-workers"], env=env)

    running = {worker_id: start(worker_id) for worker_id in range(workers)}
    restarts = dict.fromkeys(running, 0)
    codes: dict[int, int] = {}
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        for proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    forwarded = (warning_signal(), signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)  # blocked by a SLURM job script until handled
    try:
        while running:
            for worker_id, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                if code == PreemptedError.exit_code and not stopping and restarts[worker_id] < _MAX_LOCAL_RESTARTS:
                    restarts[worker_id] += 1
                    print(f"deepsports: tune worker {worker_id} was stopped (exit {code}); restarting it "
                          f"(restart {restarts[worker_id]})", file=sys.stderr)
                    running[worker_id] = start(worker_id)
                    continue
                codes[worker_id] = code
                del running[worker_id]
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [code for code in codes.values() if code != 0]
    if failed:
        print(f"deepsports: {len(failed)} of {len(codes)} tune workers failed (exit codes "
              f"{[codes[w] for w in sorted(codes)]})", file=sys.stderr)
        return 75 if all(code == 75 for code in failed) else max(failed)
    return 0


#: How often ``--workers N`` restarts one stopped worker (a worker stopped more often stays stopped).
_MAX_LOCAL_RESTARTS = 10


def _strip_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == name:
            skip = True
            continue
        if item.startswith(name + "="):
            continue
        out.append(item)
    return out
