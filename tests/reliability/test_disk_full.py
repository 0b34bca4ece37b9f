"""A full file system under the checkpoint directory, the clip cache or the tracking store: one clear
error naming the path, the free space and what was written, exit code 6, nothing half-written left,
the newest good checkpoint intact, and a study worker that stops instead of failing trial after trial.
The full disk is a small tmpfs (mounted here: the tests run as root, as in CI)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.data.cache import write_clip
from deepsports.errors import DiskFullError
from deepsports.tags import PAUSED_BY_ATTR
from deepsports.tracking.runs import RunTracker
from deepsports.train.checkpoints import load_checkpoint
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TINY, TUNE_SPACE, as_args, deepsports_cmd, local_env, subprocess_env, tiny_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SmallFs(type(Path())):
    """A mounted tmpfs; :meth:`resize` shrinks or grows it."""

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs mounted for the test, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root: run the suite as root, as CI does (a skipped test proves nothing)")
    mount = SmallFs(tmp_path / "small")
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _used(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fill(directory: Path) -> None:
    """Write a filler file until the file system says it is full."""
    with open(directory / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def test_a_full_checkpoint_disk_is_one_clear_error_and_the_last_good_checkpoint_stays(tmp_path, small_fs,
                                                                                      tiny_cache_dir, store_uri):
    uri = store_uri
    ckpt = small_fs / "ckpt"
    values = tiny_overrides(tmp_path, epochs=1, checkpoint_dir=ckpt, evaluate="false", cache_dir=tiny_cache_dir)
    first = subprocess.run(deepsports_cmd("train", *as_args(values)), env=subprocess_env(uri), cwd=tmp_path,
                           capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-4000:]
    good = (ckpt / "epoch-0001.pt").read_bytes()
    # Room for less than half of the next epoch's checkpoint.
    small_fs.resize(_used(small_fs) + len(good) // 2)
    values["epochs"] = "2"
    proc = subprocess.run(deepsports_cmd("train", *as_args(values)), env=subprocess_env(uri), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 6, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("deepsports: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "no space left writing checkpoint epoch-0002.pt" in errors[0] and str(ckpt) in errors[0]
    assert " free on its file system" in errors[0] and " were written" in errors[0]
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".pt" or p.name.startswith(".tmp")) == \
        ["best.pt", "epoch-0001.pt"]  # no partial file
    assert (ckpt / "epoch-0001.pt").read_bytes() == good and load_checkpoint(ckpt / "epoch-0001.pt")["epoch"] == 2
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["deepsports.failure_reason"].startswith("DiskFullError: ")


def test_a_full_clip_cache_disk_names_the_clip_and_leaves_no_temp_file(small_fs):
    small_fs.resize(256 * 1024)
    directory = small_fs / "clips"
    directory.mkdir()
    write_clip(directory / "01_01.npy", np.zeros((2, 8, 8, 3), np.uint8))
    before = (directory / "01_01.npy").read_bytes()
    with pytest.raises(DiskFullError, match=r"no space left writing clip cache file 01_02\.npy to .*01_02\.npy.*free"):
        write_clip(directory / "01_02.npy", np.zeros((8, 128, 128, 3), np.uint8))  # 384 KiB
    assert sorted(p.name for p in directory.iterdir()) == ["01_01.npy"]
    assert (directory / "01_01.npy").read_bytes() == before


def test_a_full_tracking_store_disk_is_a_disk_full_error_not_retried(small_fs, monkeypatch):
    monkeypatch.chdir(small_fs)  # local artifacts (./mlruns) on the small file system too
    uri = f"sqlite:///{small_fs / 'mlflow.db'}"
    tracker = RunTracker(uri)
    tracker.start(experiment_name="full")
    _fill(small_fs)
    with pytest.raises(DiskFullError, match=r"no space left writing log text \(tracking store"):
        tracker.log_text("x" * 200_000, "big.txt")
    with pytest.raises(DiskFullError, match=r"no space left writing log metrics \(tracking store"):
        for step in range(200):  # enough points to need new database pages
            tracker.log_metrics({f"m{i}": float(i) for i in range(500)}, step=step)


def test_a_tune_worker_stops_on_a_full_disk_and_its_trial_waits(tmp_path, small_fs, tiny_cache_dir, store_uri):
    uri = store_uri
    storage = str(tmp_path / "study.journal")
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    small_fs.resize(4 * 1024 * 1024)  # far less than one checkpoint of the tiny model
    settings = {**TINY, "cache_dir": str(tiny_cache_dir), "epochs": 2, "evaluate": "false",
                "checkpoint_dir": str(small_fs / "ckpt")}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    cmd = deepsports_cmd("tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage, "--n-trials", "3",
                         "--pruner", "none", "--seed", "0", *sets)
    proc = subprocess.run(cmd, env=local_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 6, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("deepsports: error:")]
    assert len(errors) == 1 and "no space left writing checkpoint epoch-0001.pt" in errors[0], proc.stderr[-4000:]
    (trial,) = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials(deepcopy=False)
    assert trial.state == TrialState.WAITING and PAUSED_BY_ATTR in trial.user_attrs  # resumes once space is freed
