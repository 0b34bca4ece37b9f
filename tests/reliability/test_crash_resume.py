"""SIGKILL at random moments of `deepsports train`, restarted each time, against one uninterrupted run.

The first kill lands inside epoch 1, before any checkpoint; the others during a checkpoint write (a
``.tmp-`` file is in the checkpoint directory), right after an epoch checkpoint appears (while that
epoch's metrics are being logged) and at seeded random moments. After every kill the checkpoint
directory holds a loadable checkpoint (or none yet) and never hands out a temp file, and the one MLflow
run is left RUNNING; at the end that run is FINISHED with every epoch logged once, and its metrics are
bit-identical to an uninterrupted run with the same seed (CPU, one thread).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deepsports.train.checkpoints import CheckpointManager, load_checkpoint
from deepsports.train.loop import EPOCH_METRICS
from tests.e2e_helpers import as_args, deepsports_cmd, run_checked, subprocess_env, tiny_overrides, wait_for

pytestmark = pytest.mark.slow

EPOCHS = 6
#: Wall-clock figures; everything else must repeat exactly.
TIMING_METRICS = {"epoch_seconds", "clips_per_s", "data_wait_fraction"}
#: (moment, seeded extra delay range in s): what each restart waits for before its SIGKILL.
KILL_PLAN = (("checkpoint-write", 0.0), ("after-checkpoint", 0.0), ("random", 2.5))


def _train_args(tmp_path: Path, ckpt: Path, experiment: str, cache_dir: Path) -> list[str]:
    return as_args(tiny_overrides(tmp_path, epochs=EPOCHS, checkpoint_dir=str(ckpt), evaluate="false",
                                  experiment_name=experiment, seed=3, cache_dir=cache_dir))


def _epoch_files(ckpt: Path) -> set[str]:
    return {p.name for p in ckpt.glob("epoch-*.pt")} if ckpt.is_dir() else set()


def _temp_files(ckpt: Path) -> list[str]:
    return [p.name for p in ckpt.glob(".tmp-*")] if ckpt.is_dir() else []


def _kill_at(proc: subprocess.Popen, ckpt: Path, moment: str, delay: float, timeout: float = 240) -> str:
    """Wait for ``moment`` (then ``delay`` s) and SIGKILL; returns what was seen, or 'exited'."""
    start_files = _epoch_files(ckpt)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if moment == "checkpoint-write" and _temp_files(ckpt):
            break
        if moment in ("after-checkpoint", "random") and _epoch_files(ckpt) - start_files:
            # random: the first kill of the pair lands after a new epoch began, the delay moves it anywhere
            break
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        return "exited"
    seen = "tmp file present" if _temp_files(ckpt) else "no tmp file"
    proc.kill()
    proc.wait()
    return seen


def _assert_checkpoint_dir_is_usable(ckpt: Path, run_id: str | None) -> int:
    """The newest usable checkpoint loads, is a final epoch file and belongs to the run; returns its epoch."""
    found = CheckpointManager(ckpt).latest_valid()
    if found is None:
        return 0
    path, state = found
    assert not path.name.startswith(".tmp-") and path.parent == ckpt, path
    assert load_checkpoint(path)["epoch"] == state["epoch"]
    if run_id is not None:
        assert state["mlflow_run_id"] == run_id
    return int(state["epoch"]) - 1  # the checkpoint of epoch N resumes at epoch N + 1


def _kill_before_the_first_checkpoint(cmd: list[str], env: dict[str, str], tmp_path: Path, ckpt: Path) -> None:
    """Start ``cmd`` and SIGKILL it inside epoch 1: its run exists and its data is loaded, no checkpoint yet."""
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log_file:
        first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: " train / " in log_path.read_text() or first.poll() is not None, timeout=240,
                     interval=0.02, what="training to start")
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -9 and not _epoch_files(ckpt), log_path.read_text()[-3000:]


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_cache_dir, store_uri):
    """Also the first kill: an epoch on real data takes hours, so a kill inside epoch 1 (before any
    checkpoint) must be continued by the next start, not leave a RUNNING orphan run beside a second one."""
    uri = store_uri
    env = subprocess_env(uri, OMP_NUM_THREADS="1")
    rng = random.Random(7)

    reference = run_checked(deepsports_cmd("train", *_train_args(tmp_path, tmp_path / "ref-ckpt", "reference",
                                                                 tiny_cache_dir)), env, cwd=tmp_path)
    reference_run = json.loads(reference.stdout[reference.stdout.index("{"):])["run_id"]

    ckpt = tmp_path / "ckpt"
    args = _train_args(tmp_path, ckpt, "killed", tiny_cache_dir)
    _kill_before_the_first_checkpoint(deepsports_cmd("train", *args), env, tmp_path, ckpt)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    [killed] = client.search_runs([experiment])
    run_id = killed.info.run_id
    done = [_assert_checkpoint_dir_is_usable(ckpt, run_id)]
    seen = ["before the first checkpoint"]
    # The next kill waits for the first checkpoint, then the plan's moments.
    for moment, spread in (("after-checkpoint", 0.0), *KILL_PLAN):
        proc = subprocess.Popen(deepsports_cmd("train", *args), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen.append(f"{moment}: {_kill_at(proc, ckpt, moment, rng.uniform(0, spread))}")
        done.append(_assert_checkpoint_dir_is_usable(ckpt, run_id))
        assert done[-1] >= done[-2]  # a restart never loses a finished epoch
        if not seen[-1].endswith("exited"):
            runs = client.search_runs([experiment])  # the same run, left RUNNING: SIGKILL gives no chance to end it
            assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "RUNNING")], seen
    assert done[1] >= 1, (seen, done)  # the start after the early kill trained on in the same run
    kills = [s for s in seen if not s.endswith("exited")]
    assert len(kills) >= 4, seen
    assert any("tmp file present" in s for s in seen), seen  # at least one kill during a checkpoint write

    final = run_checked(deepsports_cmd("train", *args), env, cwd=tmp_path)
    summary = json.loads(final.stdout[final.stdout.index("{"):])
    assert summary["run_id"] == run_id
    assert 2 <= summary["resumed_from_epoch"] == done[-1], (summary, done)
    assert "resuming from" in final.stderr
    assert not _temp_files(ckpt)  # the next save removed what the killed writers left

    runs = client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert int(runs[0].data.tags["deepsports.resumes"]) >= 1
    for key in EPOCH_METRICS:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (key, seen)  # each epoch exactly once
        if key in TIMING_METRICS:
            continue
        expected = sorted(client.get_metric_history(reference_run, key), key=lambda m: m.step)
        assert [m.value for m in history] == [m.value for m in expected], (key, seen)  # bit-identical
    assert client.get_run(run_id).data.metrics["best_val_spearman"] == \
        client.get_run(reference_run).data.metrics["best_val_spearman"]
    print(f"\n[reliability] crash/resume: kills={len(kills)} ({'; '.join(seen)}), epochs done after each kill "
          f"{done}, final metrics bit-identical to the uninterrupted run")
