"""deploy/slurm-cluster.sh for real: a second, throw-away multi-node cluster (own name, subnet, ports and
state) comes up beside the shared ones, runs a two-node step, and `down` leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e_helpers import REPO, free_port

pytestmark = pytest.mark.multinode

SCRIPT = REPO / "deploy" / "slurm-cluster.sh"


def _leftovers(name: str, state: Path) -> list[str]:
    """Namespaces, links and processes of cluster ``name`` that still exist."""
    out = [f"netns {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                  check=True).stdout.split() if n.startswith(f"{name}-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    out += [f"link {line.split(': ')[1]}" for line in links.splitlines() if line.split(": ")[1].startswith(f"{name}-")]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(state) in cmdline:
                out.append(f"process {proc.name}: {cmdline}")
    return out


def test_up_gives_idle_nodes_that_run_steps_and_down_leaves_nothing(tmp_path):
    name, state = "dst", Path("/var/tmp") / f"deepsports-cluster-test-{os.getpid()}"
    env = {**os.environ, "DEEPSPORTS_CLUSTER_NAME": name, "DEEPSPORTS_CLUSTER_STATE": str(state),
           "DEEPSPORTS_CLUSTER_NET": "10.78.0", "DEEPSPORTS_CLUSTER_PORT": str(free_port())}
    conf = {**env, "SLURM_CONF": str(state / "slurm.conf")}
    try:
        up = subprocess.run([str(SCRIPT), "up", "--nodes", "2"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "2 nodes up: node1=idle node2=idle" in up.stdout
        again = subprocess.run([str(SCRIPT), "up", "--nodes", "2"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "started" not in again.stdout, again.stdout  # idempotent
        # One step over both nodes: each its own hostname and address, each resolving the other by name.
        step = subprocess.run(["srun", "-N2", "-l", "sh", "-c", "echo $(hostname) $(getent hosts node1 node2 | wc -l)"
                               " $(ip -o -4 addr show eth0 | awk '{print $4}')"], env=conf, capture_output=True,
                              text=True, timeout=120)
        assert step.returncode == 0, step.stderr
        assert sorted(step.stdout.splitlines()) == ["0: node1 2 10.78.0.11/24", "1: node2 2 10.78.0.12/24"]
        status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "slurmd node2 (10.78.0.12, namespace dst-node2): running" in status.stdout
        # A crashed run: slurmctld killed outright, a job process left inside a node.
        subprocess.run(["sbatch", "-w", "node1", "--wrap", "sleep 300"], env=conf, check=True, capture_output=True)
        ctld = int((state / "run" / "slurmctld.pid").read_text())
        os.kill(ctld, 9)
        # `up` after the crash cleans up what was left and starts afresh.
        up = subprocess.run([str(SCRIPT), "up", "--nodes", "2"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0 and "2 nodes up: node1=idle node2=idle" in up.stdout, up.stdout + up.stderr
        assert "deleted node namespace dst-node1" in up.stdout and int((state / "run" / "slurmctld.pid").read_text()) != ctld
    finally:
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _leftovers(name, state) == []
    status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "slurmctld: not running" in status.stdout
    subprocess.run(["rm", "-rf", str(state)], check=True)
