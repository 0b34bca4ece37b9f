"""DataLoader workers and the job's stop signals: a signal sent to the whole process group, even while
the workers are being forked, reaches only the main process's flag and every batch still arrives."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.e2e_helpers import REPO

SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys, torch
    from deepsports.signals import StopFlag
    from deepsports.train.evaluation import make_loader

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            return torch.full((2,), float(i))

    sig = getattr(signal, sys.argv[1])
    rounds = 5
    with StopFlag() as flag:
        for _ in range(rounds):
            # The sender is another process, as in the field (SLURM's stepd, `kill -- -<pgid>`, `timeout`).
            killer = subprocess.Popen(["sh", "-c", f"read go; kill -{sig.name[3:]} -{os.getpgrp()}"],
                                      stdin=subprocess.PIPE, text=True)
            loader = make_loader(Slow(), 2, 2)
            iterator = iter(loader)           # the workers are forked here ...
            killer.communicate("go\\n")       # ... and the group signal lands while they start
            seen = sorted(float(v) for batch in iterator for v in batch[:, 0])
            assert seen == [float(i) for i in range(8)], seen
        print(flag.signal_name, flag.count)
""")


def _run(sig: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, sig], cwd=REPO, capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # its own process group: the signal reaches nothing else


def test_a_group_sigterm_while_workers_start_reaches_only_the_flag():
    proc = _run("SIGTERM")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["SIGTERM", "5"]  # five signals in a row: one flag, every one counted


EXIT_WITH_A_LIVE_LOADER = textwrap.dedent("""
    import torch
    from deepsports.train.evaluation import make_loader

    kept = iter(make_loader(torch.utils.data.TensorDataset(torch.zeros(64, 2)), 2, 2))
    next(kept)
    print("exiting", flush=True)  # the iterator is never closed: multiprocessing's exit terminates its workers
""")


def test_a_process_exiting_with_a_live_loader_still_ends_its_workers():
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_A_LIVE_LOADER], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr[-4000:]


def test_a_group_sigusr1_while_workers_start_reaches_only_the_flag():
    proc = _run("SIGUSR1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["SIGUSR1", "5"]
