"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Groups of tests that share a server or a cluster: under pytest-xdist (`make test` runs two workers) each
#: group runs in one worker, one test after another, as the tests expect of the cluster they submit to.
_SHARED_RESOURCES = (("multinode", "multinode"), ("slurm", "slurm-local"))
#: The longest groups (about 1.5-3 min each on 2 cores), handed out first so that no worker is left with one
#: of them at the end while the other idles. A module not named here runs as one unit in collection order.
_LONG_FIRST = ("slurm-local", "multinode", "tests/reliability/test_exact_resume.py", "tests/cli/test_ecosystem.py",
               "tests/train/test_ddp.py", "tests/reliability/test_concurrent_writers.py",
               "tests/reliability/test_group_signals.py", "tests/train/test_seeds.py")


def pytest_configure(config: pytest.Config) -> None:
    # A shell that starts `make test` in the background (`make test &`, a CI runner without job control) hands
    # it SIGINT ignored, and every child would inherit that: the Ctrl-C tests would test nothing. Python's own
    # handler here makes children start with the default disposition, as from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # An xdist worker computes in its own process on its share of the cores: two workers each spinning all the
    # cores' OpenMP threads run several times slower than one thread each. Not OMP_NUM_THREADS: the processes a
    # test starts (SLURM jobs among them) keep their own defaults, which their tests' timing windows were set by.
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def _group(item: pytest.Item) -> str:
    for marker, group in _SHARED_RESOURCES:
        if item.get_closest_marker(marker) or f"{marker}_cluster" in getattr(item, "fixturenames", ()):
            return group
    return item.nodeid.split("::", 1)[0]  # its module: module fixtures are made once


def _distributed(config: pytest.Config) -> bool:
    return config.getoption("dist", "no") != "no" or hasattr(config, "workerinput")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Each test in one xdist group (``--dist loadgroup``): its shared resource's or its module's. Marked as it is
    collected, before any ``pytest_collection_modifyitems`` (pytest-xdist's reads the marks there)."""
    if _distributed(item.config):
        item.add_marker(pytest.mark.xdist_group(_group(item)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist's loadgroup marks a grouped test by a suffix of its node id; where that no longer takes (its
    issue #1386, pytest 9.2), the groups are ignored without a word, and two workers would share a cluster."""
    if hasattr(session.config, "workerinput") and session.items and "@" not in session.items[0].nodeid:
        message = ("pytest-xdist ignored the test groups (pytest-xdist issue #1386, pytest >= 9.2): install the "
                   "pytest that pyproject.toml's test extra pins, or run PYTEST_WORKERS=0")
        print(f"\nerror: {message}", file=sys.__stderr__, flush=True)  # a worker's exception reaches no terminal
        raise pytest.UsageError(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the longest groups first."""
    if not _distributed(config):
        return
    rank = {group: index for index, group in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def mtl_aqa_dir() -> Path:
    """The folder of the real MTL-AQA annotation and split pickles shipped inside the package."""
    from deepsports.data.annotations import shipped_annotation_files

    return shipped_annotation_files().annotations.parent


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic dataset (48 clips, seed 0) in the MTL-AQA layout, generated once per session."""
    from deepsports.data.synth import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "n48_s0", n_clips=48, seed=0, progress=False)


#: What DeepSports and MLflow write in the working directory or beside a store: a test writes them only under
#: its temporary folders. The session fails if any appears in the clone (.ci/run checks the whole tree too).
_OUTPUTS = ("mlruns", "mlartifacts", "mlflow.db", "checkpoints", "losses.png", "optuna-journal.log", "experiments")


def _outputs_in_clone() -> set[str]:
    found = set()
    for name in _OUTPUTS:
        top = REPO / name
        if top.is_file():
            found.add(name)
        for folder, _dirs, files in os.walk(top):
            found.update(str(Path(folder, f).relative_to(REPO)) for f in files if "__pycache__" not in folder)
    return found


@pytest.fixture(scope="session", autouse=True)
def clone_stays_clean(tmp_path_factory: pytest.TempPathFactory):
    """No test leaves runs, stores, checkpoints or exported configs in the clone (issue #25: two 31 MB orphan
    run folders appeared in the clone's mlruns/ after `make test`). A test that names no store of its own gets
    a session store under the temporary folder, not the clone's ``mlflow.db`` that the Makefile exports."""
    before = _outputs_in_clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('session-store') / 'mlflow.db'}")
        yield
    new = sorted(_outputs_in_clone() - before)
    if new:
        pytest.fail(f"the tests wrote {len(new)} files into the clone {REPO} (tests write under their tmp_path): "
                    + ", ".join(new[:20]), pytrace=False)


@pytest.fixture(autouse=True)
def package_logger_restored():
    """The ``deepsports`` logger as each test found it: an in-process command configures it once
    (its own handler, no propagation), after which pytest's ``caplog`` (on the root logger) would see
    nothing of the tests that follow."""
    import logging

    logger = logging.getLogger("deepsports")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running local SLURM cluster (deploy/slurm-local.sh start; idempotent: a running one is used as it is).

    Installs slurm-wlm and munge when they are missing (needs root and apt, as in CI) and leaves the
    cluster running; `.ci/run` stops it at the end.
    """
    script = REPO / "deploy" / "slurm-local.sh"
    proc = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{script} start failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny synthetic set and clip cache (tests.e2e_helpers.TINY) shared by the study tests, made
    before any worker starts (concurrent workers would otherwise race to make it). Read-only: a test
    that damages cached clips makes its own."""
    from deepsports.config import build_config
    from deepsports.data import build_datasets
    from tests.e2e_helpers import TINY

    path = tmp_path_factory.mktemp("tiny-cache")
    build_datasets(build_config({**TINY, "cache_dir": str(path)}), progress=False)
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store; the working directory moves too (MLflow puts artifacts in ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store that MLflow itself created (every migration applied), made once per session."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path.parent)  # MLflow roots the Default experiment's artifacts in ./mlruns: not the clone's
        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store_uri(tmp_path, migrated_store) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``, a copy of ``migrated_store``: the store as a user's second run finds
    it. The first open of a new store runs MLflow's migrations (2-4 s per test); tests of that first open, and of
    processes racing to create a store, use a path of their own instead."""
    from tests.e2e_helpers import copy_store

    return copy_store(migrated_store, tmp_path)
