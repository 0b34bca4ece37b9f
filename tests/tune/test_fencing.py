"""The trial lease (deepsports.tune.recovery.TrialLease): a worker whose study storage stops answering ends
itself, with nothing more written, before any other worker may fail and retry its trial. The real thing
(a node's link cut mid-trial on a multi-node SLURM cluster): tests/multinode/test_field.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from deepsports.tune.recovery import FENCED_EXIT_CODE

WORKER = textwrap.dedent("""
    import sys, threading, time
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from deepsports.tune.recovery import TrialHeartbeat, TrialLease

    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(sys.argv[1])))
    trial = study.ask()
    hang = threading.Event()
    write = study._storage.set_trial_user_attr

    def set_attr(*args):  # the storage's network is gone: a call never returns
        if hang.is_set():
            threading.Event().wait()
        return write(*args)

    study._storage.set_trial_user_attr = set_attr
    with TrialHeartbeat(study, trial._trial_id, 0.5) as beat, TrialLease(beat, 1.5, trial.number):
        time.sleep(2.5)  # beats go through: the lease is renewed, nothing happens
        print("alive", flush=True)
        hang.set()
        time.sleep(30)
    print("not fenced", flush=True)
""")


def test_a_worker_cut_off_from_its_storage_ends_itself_when_its_lease_runs_out(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "study.journal")], capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == FENCED_EXIT_CODE == 9, proc.stderr
    assert proc.stdout == "alive\n"
    (line,) = [line for line in proc.stderr.splitlines() if "fenced" in line]
    assert line.startswith("deepsports: fenced: no heartbeat of trial 0 reached the study storage for ")
    assert "(lease 2 s)" in line and line.endswith(", exit 9)")
    assert elapsed < 25  # ended by the lease, not by the 30 s sleep


def test_the_lease_lies_between_the_heartbeat_interval_and_the_grace_period():
    from deepsports.tune.recovery import lease_seconds

    assert lease_seconds(60, 120) == 90.0 and lease_seconds(3, 20) == 11.5
    for interval, grace in ((1, 2), (60, 120), (5, 300)):
        assert interval < lease_seconds(interval, grace) < grace
