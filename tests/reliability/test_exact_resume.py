"""Exact resume (issue #22): a run stopped at seeded moments and resumed each time ends bit-identical to
the same run never stopped: every logged metric history (but wall-clock figures), the best epoch, the
final test metrics and the final weights, compared with ``==``.

Each attempt is a fresh process (``tests/reliability/resume_worker.py``, forked from a server that
imported the libraries once: ``tests/reliability/forked_attempts.py``) that signals its own process
group at the N-th call of ``train``'s fault hook at a named point: SIGTERM/SIGUSR1 (the loop checkpoints
and exits 75) or SIGKILL (the next attempt resumes from the last complete checkpoint and recomputes).
Four tiny configurations share the axes: ``num_workers`` 0 and 2, ``data_aug`` on and off, every random
``frame_method``, ``feature_norm`` batchnorm and none, dropout and drop-path, one process and 2-rank gloo
DDP. The sequences run in parallel threads; each configuration's uninterrupted reference is run once.
A last sequence removes the RNG state from a partial checkpoint: its resume is tagged inexact and the
same comparison fails, so the comparison does catch a lost state.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from deepsports.tags import RESUME_EXACT_TAG, RESUME_INEXACT_TAG
from deepsports.train.checkpoints import load_checkpoint, save_checkpoint
from tests.e2e_helpers import TINY, copy_store, deepsports_cmd, free_port, subprocess_env
from tests.reliability import forked_attempts

pytestmark = pytest.mark.slow

EPOCHS = 2
#: Wall-clock figures: everything else must repeat exactly.
TIMING_METRICS = {"epoch_seconds", "clips_per_s", "data_wait_fraction"}
COMMON = {**TINY, "dropout": "0.3", "epochs": EPOCHS, "seed": 5, "log_model": "false", "system_metrics_interval_s": 0}
#: Train steps per epoch of TINY (24 training clips, batch 4).
STEPS = 6

_rng = random.Random(22)  # the seeded "random" stop moments; the N of a step stop counts this attempt's steps
CONFIGS = {
    "w0-random-bn-droppath": (
        {"num_workers": 0, "data_aug": "false", "frame_method": "random", "feature_norm": "batchnorm",
         "drop_path_rate": 0.1},
        # stop after epoch 1 (signal during its validation), mid epoch 2, between epoch 2's file and best.pt,
        # during the final evaluation (test metrics logged, artifacts not)
        ["validate:1:TERM", f"step:{_rng.randint(1, STEPS - 1)}:TERM", "checkpoint_written:1:KILL", "final:1:KILL"]),
    "w2-aug-varied-none": (
        {"num_workers": 2, "data_aug": "true", "frame_method": "spaced_varied", "feature_norm": "none"},
        # mid epoch 1 (killed), a signal during a checkpoint write, killed before epoch 2's metrics are
        # logged, a signal during the final evaluation (the run finishes)
        [f"step:{_rng.randint(1, STEPS)}:KILL", "checkpoint:1:TERM", "log:1:KILL", "final:1:TERM"]),
    "w2-varied-new-bn": (
        {"num_workers": 2, "data_aug": "false", "frame_method": "spaced_varied_new", "feature_norm": "batchnorm"},
        # two signals mid-epoch (SIGTERM then SIGUSR1), then killed before epoch metrics are logged
        [f"step:{_rng.randint(1, STEPS - 2)}:TERM", f"step:{_rng.randint(1, 2)}:USR1", "log:1:KILL"]),
    "ddp-aug-fixed-new-bn": (
        {"num_workers": 0, "data_aug": "true", "frame_method": "spaced_fixed_new", "feature_norm": "batchnorm",
         "batch_size": 5},  # 5 clips over 2 ranks: shards of 3 and 2, so the ranks' RNG streams differ
        [f"step:{_rng.randint(1, 8)}:TERM", "log:1:KILL"]),
}
LOST_STATE = "w2-varied-new-bn"  # the configuration whose partial checkpoint loses its RNG state


@dataclass
class Sequence:
    name: str
    directory: Path
    uri: str
    ranks: int
    values: dict[str, str]
    attempts: list[tuple] = field(default_factory=list)  # (stop, each rank's exit code..., stderr tail)

    def args(self, run: str) -> list[str]:
        values = {**self.values, "experiment_name": run, "checkpoint_dir": str(self.directory / f"ckpt-{run}")}
        return [f"{k}={v}" for k, v in values.items()]

    def attempt(self, run: str, stop: str) -> int:
        """One attempt of run ``run`` stopped at ``stop``; returns rank 0's exit code."""
        env = subprocess_env(self.uri, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
        codes, err = forked_attempts.run([stop, *self.args(run)], env, self.directory, self.directory / f"{run}.log",
                                         self.ranks)
        self.attempts.append((stop, *codes, err[-3000:]))
        return codes[0]


def _run_sequence(seq: Sequence, stops: list[str]) -> Sequence:
    seq.attempt("reference", "-")
    for stop in [*stops, "-"]:
        seq.attempt("stopped", stop)
    return seq


def _lost_state_sequence(seq: Sequence) -> Sequence:
    """Stopped mid epoch 1; its partial checkpoint then loses its RNG states (as an older version's would)."""
    seq.attempt("lost", "step:3:TERM")
    [partial] = (seq.directory / "ckpt-lost").glob("epoch-*-partial.pt")
    state = load_checkpoint(partial)
    del state["rng"], state["rng_ranks"]
    save_checkpoint(partial, state)
    seq.attempt("lost", "-")
    return seq


@pytest.fixture(scope="module")
def sequences(tmp_path_factory, tiny_cache_dir, migrated_store) -> dict[str, Sequence]:
    from deepsports.config import build_config
    from deepsports.data import build_datasets

    root = tmp_path_factory.mktemp("exact-resume")
    cache = root / "cache"
    shutil.copytree(tiny_cache_dir, cache)
    # data_aug caches a larger frame: made here, before parallel processes would race to make it
    build_datasets(build_config({**TINY, "data_aug": True, "cache_dir": str(cache)}), progress=False)
    seqs = {}
    for name, (values, _stops) in CONFIGS.items():
        directory = root / name
        directory.mkdir()
        ranks = 2 if name.startswith("ddp") else 1
        seqs[name] = Sequence(name, directory, copy_store(migrated_store, directory), ranks,
                              {k: str(v) for k, v in {**COMMON, "cache_dir": str(cache), **values}.items()})
    lost = Sequence("lost", seqs[LOST_STATE].directory, seqs[LOST_STATE].uri, 1, seqs[LOST_STATE].values)
    with concurrent.futures.ThreadPoolExecutor(len(seqs) + 1) as pool:
        jobs = [pool.submit(_run_sequence, seqs[name], stops) for name, (_values, stops) in CONFIGS.items()]
        jobs.append(pool.submit(_lost_state_sequence, lost))
        for job in jobs:
            job.result()
    seqs["lost"] = lost
    return seqs


def _run(client: MlflowClient, experiment: str):
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric's points (a point logged twice shows twice), wall-clock and system figures left out."""
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in sorted(run.data.metrics) if key not in TIMING_METRICS and not key.startswith("system/")}


def _weights(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_checkpoint(ckpt / name)["model"] for name in (f"epoch-{EPOCHS:04d}.pt", "best.pt")}


def assert_same_run(seq: Sequence, run_name: str) -> None:
    """``run_name`` of ``seq`` is the reference run to the bit: metrics, best epoch, test metrics, weights."""
    client = MlflowClient(seq.uri)
    reference, run = _run(client, "reference"), _run(client, run_name)
    assert run.info.status == reference.info.status == "FINISHED", seq.attempts
    expected, got = _histories(client, reference), _histories(client, run)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key] == expected[key], (key, seq.attempts)
    assert run.data.tags["deepsports.best_epoch"] == reference.data.tags["deepsports.best_epoch"]
    assert any(key.startswith("test_") for key in expected)
    ref_weights, weights = _weights(seq.directory / "ckpt-reference"), _weights(seq.directory / f"ckpt-{run_name}")
    for name, state in ref_weights.items():
        assert sorted(weights[name]) == sorted(state)
        for key, tensor in state.items():
            assert torch.equal(weights[name][key], tensor), (name, key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_run_stopped_and_resumed_at_seeded_moments_equals_the_uninterrupted_run(sequences, name):
    seq = sequences[name]
    codes = [attempt[1:-1] for attempt in seq.attempts]
    # every stop stopped it (exit 75 after a signal, -9 after SIGKILL), but a signal during the final
    # evaluation, which lets the run finish; the last attempt finishes
    for (stop, *exits, _err), expected in zip(seq.attempts[1:], [*CONFIGS[name][1], "-"]):
        assert stop == expected
        wanted = 0 if stop in ("-", "final:1:TERM") else (-9 if stop.endswith("KILL") else 75)
        assert set(exits) == {wanted}, (stop, exits, _err)
    assert list(codes[0]) == [0] * seq.ranks, seq.attempts[0]
    assert_same_run(seq, "stopped")
    client = MlflowClient(seq.uri)
    tags = _run(client, "stopped").data.tags
    assert tags[RESUME_EXACT_TAG] == "true" and tags[RESUME_INEXACT_TAG] == "-", tags
    assert int(tags["deepsports.resumes"]) == len(CONFIGS[name][1]) - (1 if "final:1:TERM" in CONFIGS[name][1] else 0)
    print(f"\n[exact-resume] {name}: stops {CONFIGS[name][1]}: metrics, best epoch, test metrics and weights "
          f"== the uninterrupted run")


def test_a_resume_that_lost_its_rng_state_is_tagged_inexact_and_fails_the_comparison(sequences):
    seq = sequences["lost"]
    assert [a[1] for a in seq.attempts] == [75, 0], seq.attempts
    tags = _run(MlflowClient(seq.uri), "lost").data.tags
    assert tags[RESUME_EXACT_TAG] == "false" and "no RNG state" in tags[RESUME_INEXACT_TAG], tags
    with pytest.raises(AssertionError):
        assert_same_run(seq, "lost")


def test_running_a_finished_train_again_says_so_and_logs_nothing(sequences):
    """Issue #25 (2): the same command after the run FINISHED: one line, exit 0, no new metric point, tag or status."""
    seq = sequences["w2-aug-varied-none"]
    client = MlflowClient(seq.uri)
    before = _run(client, "stopped")
    histories = _histories(client, before)
    proc = subprocess.run(deepsports_cmd("train", *seq.args("stopped")), env=subprocess_env(seq.uri), cwd=seq.directory,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {before.info.run_id} already finished" in proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["run_id"] == before.info.run_id
    assert summary["best_epoch"] == int(before.data.tags["deepsports.best_epoch"])
    assert summary["test_spearman"] == before.data.metrics["test_spearman"]
    after = _run(client, "stopped")
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and _histories(client, after) == histories
