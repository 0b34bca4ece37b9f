"""A signal that lands while a checkpoint is being written (issue #25 item 1).

A KeyboardInterrupt inside ``torch.save`` tears the zip it writes (torch: ``RuntimeError: [enforce fail at
inline_container.cc...]``): the run ended FAILED with a traceback, a trial FAIL. Every checkpoint write now
holds SIGINT/SIGTERM/SIGUSR1 until the file is complete (:func:`deepsports.signals.signals_held`), then
handles them as documented: Ctrl-C -> KILLED, exit 130 (a trial paused); SIGTERM -> exit 75 after the epoch.

The head (``topology=8192,4096``: 34 M parameters, a 400 MB checkpoint with AdamW's state) makes each
write last 1-3 s on this machine while a step stays cheap. The signal is sent to the process group, as a
terminal's Ctrl-C is, the moment ``torch.save`` has written the first bytes of the
temporary file (before the fix: a RuntimeError from torch's zip writer, a FAILED run), and the process says
it held the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from deepsports.tags import INTERRUPTED_TAG, PAUSED_BY_ATTR, RUN_ATTR
from deepsports.train.checkpoints import load_checkpoint
from deepsports.tune.study import open_storage
from tests.e2e_helpers import TINY, TUNE_SPACE, as_args, deepsports_cmd, local_env, tiny_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: A head big enough that a checkpoint write lasts over a second (see the module docstring).
BIG_HEAD = {"topology": "8192,4096", "dropout": "0.1,0.1", "log_checkpoint": "false", "evaluate": "false"}
#: A temporary checkpoint smaller than this is still inside ``torch.save`` (it writes the file front to back).
MID_WRITE = 150 << 20


@pytest.fixture(scope="module")
def cache_dir(tiny_cache_dir) -> Path:
    return tiny_cache_dir


def _env(uri: str) -> dict[str, str]:
    return local_env(uri, OMP_NUM_THREADS="1")


def _signal_during_write(proc: subprocess.Popen, ckpt: Path, sig: int) -> Path:
    """Send ``sig`` to the group of ``proc`` while ``torch.save`` writes an epoch checkpoint under ``ckpt``:
    its temporary file holds its first bytes, less than :data:`MID_WRITE` (a whole file holds ~440 MB).
    Returns the checkpoint that was being written."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        for temp in ckpt.rglob(".tmp-epoch-*.pt.*"):
            try:
                size = temp.stat().st_size
            except FileNotFoundError:
                continue
            if 0 < size < MID_WRITE:
                os.killpg(proc.pid, sig)
                return temp.parent / temp.name.removeprefix(".tmp-").rsplit(".", 1)[0]
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no checkpoint write was caught (exit {proc.returncode}):\n{proc.communicate()[1][-6000:]}")


def _finish(proc: subprocess.Popen) -> str:
    _out, err = proc.communicate(timeout=240)
    assert "Traceback" not in err and "inline_container" not in err, err[-6000:]
    return err


def test_train_holds_ctrl_c_during_a_checkpoint_write(tmp_path, cache_dir, store_uri):
    """Ctrl-C inside torch.save: the file is completed, then the run ends KILLED, exit 130 (README: exit codes).
    A SIGTERM there only sets the stop flag once the write is done (tests/test_signals.py): exit 75 after it."""
    ckpt = tmp_path / "ckpt"
    values = {**tiny_overrides(tmp_path, epochs=3, checkpoint_dir=ckpt, cache_dir=cache_dir), **BIG_HEAD}
    proc = subprocess.Popen(deepsports_cmd("train", *as_args(values)), env=_env(store_uri), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    written = _signal_during_write(proc, ckpt, signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130 and "deepsports: interrupted" in err, err[-6000:]
    assert "SIGINT arrived during" in err and "held until it was complete" in err, err[-6000:]
    epoch = int(written.stem.split("-")[1])
    assert load_checkpoint(written)["epoch"] == epoch + 1  # complete: the next epoch to train
    assert not list(ckpt.glob(".tmp-*"))
    client = MlflowClient(store_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("deepsports").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags[INTERRUPTED_TAG] == "true"


def test_tune_pauses_a_trial_on_ctrl_c_during_its_checkpoint_write(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "study.journal")
    ckpt = tmp_path / "ckpt"
    (tmp_path / "space.yaml").write_text(textwrap.dedent(TUNE_SPACE))
    settings = {**TINY, "cache_dir": str(cache_dir), "epochs": 2, "checkpoint_dir": str(ckpt), **BIG_HEAD}
    sets = [arg for key, value in settings.items() if key != "learning_rate" for arg in ("--set", f"{key}={value}")]
    cmd = deepsports_cmd("tune", str(tmp_path / "space.yaml"), "--study", "s", "--storage", storage,
                         "--max-trials", "1", "--pruner", "none", "--seed", "0", *sets)
    proc = subprocess.Popen(cmd, env=_env(uri), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _signal_during_write(proc, ckpt, signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130 and "SIGINT arrived during" in err, err[-6000:]
    (trial,) = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials(deepcopy=False)
    assert trial.state == TrialState.WAITING and PAUSED_BY_ATTR in trial.user_attrs  # paused, not FAIL
    assert MlflowClient(uri).get_run(trial.user_attrs[RUN_ATTR]).info.status == "KILLED"
    status = subprocess.run(deepsports_cmd("status", "s", "--storage", storage), env=_env(uri), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-6000:]
    assert "paused" in status.stdout and "RuntimeError" not in status.stdout + status.stderr, status.stdout
