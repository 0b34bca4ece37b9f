"""The one atomic writer and the one torch-file reader (deepsports.fileio), on real files and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from deepsports.errors import CheckpointError
from deepsports.fileio import atomic_write, read_torch_file
from tests.e2e_helpers import REPO


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "state.bin"
    assert atomic_write(path, lambda handle: handle.write(b"old")) == path
    atomic_write(path, lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new" and sorted(p.name for p in path.parent.iterdir()) == ["state.bin"]


def test_a_failing_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")

    def half_then_fail(handle):
        handle.write(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]


_SLOW_WRITER = """
import sys, time
from deepsports.fileio import atomic_write
def write(handle):
    handle.write(b"new-partial")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], write, temp_prefix=".tmp-state.bin.", temp_suffix="")
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_and_a_recognisable_temp(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert path.read_bytes() == b"old"
    temps = [p for p in tmp_path.iterdir() if p != path]
    assert len(temps) == 1 and temps[0].name.startswith(".tmp-state.bin.") and temps[0].read_bytes() == b"new-partial"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_read_torch_file_reads_weights_and_names_each_failure(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4.0), "epoch": 3}, good)
    state = read_torch_file(good)
    assert torch.equal(state["w"], torch.arange(4.0)) and state["epoch"] == 3
    with pytest.raises(CheckpointError, match="missing.pt' does not exist"):
        read_torch_file(tmp_path / "missing.pt")
    data = good.read_bytes()
    for name, content in (("cut.pt", data[: len(data) // 2]), ("garbage.pt", b"not a checkpoint at all")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}' is truncated or corrupt"):
            read_torch_file(tmp_path / name)
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt' refused: .*arbitrary code \(.*GLOBAL posix.system"):
        read_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_both_checkpoint_readers_are_the_one_reader(tmp_path):
    """Resume checkpoints and pretrained weights refuse the same file with the same words."""
    from deepsports.model import read_checkpoint
    from deepsports.train.checkpoints import load_checkpoint

    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": _RunsCode(tmp_path / "pwned")}, evil)
    messages = set()
    for reader in (read_checkpoint, load_checkpoint, read_torch_file):
        with pytest.raises(CheckpointError) as info:
            reader(evil)
        messages.add(str(info.value))
    assert len(messages) == 1 and not (tmp_path / "pwned").exists()
