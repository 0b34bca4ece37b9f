"""Job arrays and the preemption round trip on a real SLURM cluster (deploy/slurm-local.sh).

The session fixture starts the local single-node cluster (installing slurm-wlm and munge when they are
missing: needs root and apt, as in CI) and leaves it running; `.ci/run` stops it at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepsports.slurm.jobs import render_script, submit
from deepsports.slurm.profile import build_profile

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]


def _tasks(job_id: str) -> dict[str, dict[str, str]]:
    """``scontrol show job`` of every task of an array (or the one job), keyed by task id ("" if no array)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    tasks = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        tasks[fields.get("ArrayTaskId", "")] = fields
    return tasks


def _active(job_id: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i %T"], capture_output=True, text=True,
                          check=True)
    return proc.stdout.splitlines()


def _wait(condition, timeout_s: float, what: str, job_id: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    squeue = subprocess.run(["squeue", "-r", "-j", job_id], capture_output=True, text=True).stdout
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (job {job_id}):\n{squeue}\n{_tasks(job_id)}")


def _profile(tmp_path: Path, **values):
    return build_profile({
        "partition": "debug", "time": "5", "cpus_per_task": 1, "mem": "200M", "grace_seconds": 30,
        "logdir": str(tmp_path / "logs"),
        # The workers import deepsports from this checkout, whatever is installed.
        "env": {"PYTHONPATH": str(REPO)},
        **values,
    }, "test")


ARRAY_WORKER = """
import json, sys, time
from deepsports.signals import StopFlag
from deepsports.slurm.jobs import slurm_env

with StopFlag() as flag:
    start = time.time()
    while time.time() - start < 2.0 and not flag.requested():
        time.sleep(0.05)
    end = time.time()
env = slurm_env()
with open(f"{sys.argv[1]}/task_{env['SLURM_ARRAY_TASK_ID']}.json", "w") as f:
    json.dump({"env": env, "start": start, "end": end, "signal": flag.signal_name}, f)
"""


def test_array_of_four_runs_at_most_two_at_once(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(ARRAY_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    profile = _profile(tmp_path, array_size=4, array_concurrency=2)
    script = render_script("tune", profile, [sys.executable, str(tmp_path / "worker.py"), str(out)],
                           job_name="test-array")
    job = submit(script, cwd=tmp_path)
    assert job is not None and job.isdigit()
    _wait(lambda: not _active(job), 90, "the array to finish", job)

    tasks = _tasks(job)
    assert sorted(tasks) == ["0", "1", "2", "3"]
    for task in tasks.values():
        assert (task["JobState"], task["ExitCode"], task["Restarts"]) == ("COMPLETED", "0:0", "0"), task
        assert task["ArrayJobId"] == job and task["ArrayTaskThrottle"] == "2"
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("task_*.json")}
    assert sorted(results) == ["task_0", "task_1", "task_2", "task_3"]
    for name, result in results.items():
        env = result["env"]
        assert env["SLURM_ARRAY_JOB_ID"] == job and name == f"task_{env['SLURM_ARRAY_TASK_ID']}"
        assert env["SLURM_RESTART_COUNT"] == "0" and env["SLURMD_NODENAME"] and result["signal"] is None
    # The throttle: at no instant were more than two workers running.
    events = sorted([(r["start"], 1) for r in results.values()] + [(r["end"], -1) for r in results.values()])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most <= 2
    for t in range(4):  # one log per task, named by %x_%A_%a
        log = (tmp_path / "logs" / f"test-array_{job}_{t}.log").read_text()
        assert f"task {job}_{t} " in log


PREEMPTIBLE_WORKER = """
import json, os, sys, time
from pathlib import Path
from deepsports.signals import StopFlag
from deepsports.slurm.jobs import requeue_self, slurm_env

out, total = Path(sys.argv[1]), int(sys.argv[2])
env = slurm_env()
task, restart = env["SLURM_ARRAY_TASK_ID"], int(env["SLURM_RESTART_COUNT"])
state = out / f"counter_{task}.json"
with StopFlag() as flag:
    step = json.loads(state.read_text())["next_step"] if state.exists() else 0
    while step < total:
        if flag.requested():
            # Checkpoint atomically, then requeue this task, then leave.
            tmp = out / f"counter_{task}.tmp"
            tmp.write_text(json.dumps({"next_step": step}))
            os.replace(tmp, state)
            record = {"signal": flag.signal_name, "at_step": step, "restart": restart}
            record["requeued"] = requeue_self()
            (out / f"preempted_{task}.json").write_text(json.dumps(record))
            sys.exit(0)
        # 0.1 s steps until the signal can arrive (the test signals after step 5); after the requeue the
        # pace proves nothing, so the restarted task finishes at once.
        time.sleep(0.1 if restart == 0 else 0.005)
        with open(out / f"progress_{task}.txt", "a") as f:
            f.write(f"{step} {restart}\\n")
        step += 1
(out / f"done_{task}.json").write_text(json.dumps({"restart": restart, "step": step}))
"""


def _progress(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines() if line.strip()]


def test_usr1_checkpoints_requeues_and_resumes_the_task(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(PREEMPTIBLE_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    total = 60  # 0.1 s steps before the requeue
    profile = _profile(tmp_path, array_size=2, array_concurrency=2)
    script = render_script("tune", profile, [sys.executable, str(tmp_path / "worker.py"), str(out), str(total)],
                           job_name="test-preempt")
    job = submit(script, cwd=tmp_path)
    _wait(lambda: all(len(_progress(out / f"progress_{t}.txt")) >= 5 for t in "01"), 60, "both tasks to run", job)

    # Signal the task that runs under the array's own job id: `scontrol requeue $SLURM_JOB_ID` would
    # requeue the whole array there, so only the <array>_<task> id keeps its sibling untouched.
    victim = next(t for t, info in _tasks(job).items() if info["JobId"] == job)
    sibling = "1" if victim == "0" else "0"
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_{victim}"], check=True)
    _wait(lambda: _tasks(job)[victim]["JobState"] == "PENDING" and _tasks(job)[victim]["Restarts"] == "1",
          30, "the signalled task to requeue itself", job)
    # The requeued task starts at its own BeginTime (cred_expire + 1 s): releasing it earlier with
    # `StartTime=now` can hit SLURM's credential window and kill the relaunch ("Job credential revoked").
    _wait(lambda: not _active(job), 240, "the array to finish", job)

    tasks = _tasks(job)
    assert (tasks[victim]["JobState"], tasks[victim]["Restarts"]) == ("COMPLETED", "1")
    assert (tasks[sibling]["JobState"], tasks[sibling]["Restarts"]) == ("COMPLETED", "0")
    preempted = json.loads((out / f"preempted_{victim}.json").read_text())
    assert preempted["signal"] == "SIGUSR1" and preempted["restart"] == 0
    assert preempted["requeued"] == f"{job}_{victim}"
    assert json.loads((out / f"done_{victim}.json").read_text()) == {"restart": 1, "step": total}

    # The restarted task went on from the saved counter: every step once, split at the checkpoint.
    steps = _progress(out / f"progress_{victim}.txt")
    at = preempted["at_step"]
    assert 5 <= at < total
    assert steps == [(s, 0) for s in range(at)] + [(s, 1) for s in range(at, total)]
    assert _progress(out / f"progress_{sibling}.txt") == [(s, 0) for s in range(total)]
    assert not (out / f"preempted_{sibling}.json").exists()
    # --open-mode=append: the requeued run continued the task's log.
    log = (tmp_path / "logs" / f"test-preempt_{job}_{victim}.log").read_text()
    assert "restart 0," in log and "restart 1," in log


def test_a_hung_controller_costs_a_job_seconds_not_its_grace_period(slurm_cluster, tmp_path, monkeypatch):
    """sbatch, scontrol requeue and scontrol show job against a controller that accepts and never answers
    (scontrol itself would wait MessageTimeout, 10 s, then retry): each fails in our time limit, one line."""
    import socket
    import threading

    from deepsports.slurm.jobs import SlurmError, job_info, requeue_self

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        held = []
        threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
        conf = Path(subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True,
                                   timeout=30).stdout.split("SLURM_CONF", 1)[1].split("=", 1)[1].split()[0])
        hung = tmp_path / "slurm.conf"
        hung.write_text(re.sub(r"(?m)^SlurmctldPort=.*$", f"SlurmctldPort={server.getsockname()[1]}",
                               conf.read_text()))
        monkeypatch.setenv("SLURM_CONF", str(hung))
        monkeypatch.setenv("DEEPSPORTS_SLURM_TIMEOUT", "1.5")
        script = render_script("train", _profile(tmp_path), ["true"])
        for call, command in ((lambda: submit(script, cwd=tmp_path), "sbatch"),
                              (lambda: requeue_self({"SLURM_JOB_ID": "1"}), "scontrol requeue 1"),
                              (lambda: job_info("1"), "scontrol -o show")):
            start = time.monotonic()
            with pytest.raises(SlurmError, match="did not answer within 1.5 s") as info:
                call()
            assert time.monotonic() - start < 5 and command in str(info.value) and "\n" not in str(info.value)
        assert held  # the controller was reached, and held the line
