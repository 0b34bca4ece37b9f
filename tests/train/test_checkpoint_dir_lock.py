"""A second process on a checkpoint_dir in use stops at once naming the holder; a dead holder's lock is
taken over. The holder here is another process holding the lock through the library, as a running
``deepsports train`` does; the second process is the real CLI."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap

from mlflow.tracking import MlflowClient

from tests.e2e_helpers import REPO, as_args, deepsports_cmd, subprocess_env, tiny_overrides

HOLDER = textwrap.dedent("""
    import sys, time
    from deepsports.train.dir_lock import checkpoint_dir_lock
    with checkpoint_dir_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(ckpt) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_stops_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, tiny_cache_dir,
                                                                                           store_uri):
    uri = store_uri
    ckpt = tmp_path / "ckpt"
    values = tiny_overrides(tmp_path, epochs=1, checkpoint_dir=ckpt, evaluate="false", cache_dir=tiny_cache_dir)
    cmd = deepsports_cmd("train", *as_args(values))
    holder = _holder(ckpt)
    try:
        busy = subprocess.run(cmd, env=subprocess_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its name stays in the lock file
        holder.wait()
    assert busy.returncode == 8, busy.stderr[-4000:]
    errors = [line for line in busy.stderr.splitlines() if line.startswith("deepsports: error:")]
    assert len(errors) == 1 and "Traceback" not in busy.stderr
    assert f"pid {holder.pid} on host {socket.gethostname()} since " in errors[0] and str(ckpt) in errors[0]
    assert not list(ckpt.glob("epoch-*.pt"))  # it stopped before training

    done = subprocess.run(cmd, env=subprocess_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"taking over the lock left by pid {holder.pid}" in done.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
    assert run.info.status == "FINISHED" and (ckpt / "epoch-0001.pt").exists()
