"""Optuna studies and their MLflow parent run: storages, sampler, pruner, creating or joining a study.

Storages (:func:`open_storage`), given as a path or URL:

* a plain path (default ``optuna-journal.log``): ``JournalStorage(JournalFileBackend(path))``, an
  append-only log with a symlink lock, safe on NFS where SQLite locking is not; a record torn by a
  writer killed mid-append is set aside (:mod:`deepsports.tune.journal`);
* ``sqlite:///file.db``, ``postgresql://...``, ``mysql://...``: ``RDBStorage`` with a heartbeat; a
  trial whose worker stops beating (killed, node lost) is failed by the next worker and queued again
  with the same params (:class:`deepsports.tune.recovery.StaleTrialRetry`, a
  ``RetryHeartbeatStaleTrialCallback``). Optuna's journal storage has no heartbeat: DeepSports keeps
  one in a trial user attribute and sweeps stale trials itself (:mod:`deepsports.tune.recovery`).

The parent run. Study creation is atomic in every storage, so exactly one process creates the
study; that process creates the MLflow parent run and stores its id in the study's user attributes.
Joiners wait for the id (:func:`open_study`); trials re-read it when they start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from deepsports.config import config_fields
from deepsports.errors import ConfigError, SearchSpaceError, StorageError
from deepsports.slurm.env import ClusterEnv, run_tags
from deepsports.tags import (
    EXPERIMENT_ATTR,
    KIND_TAG,
    OPTUNA_PRUNER_TAG,
    OPTUNA_SAMPLER_TAG,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_NAME_TAG,
    PARENT_RUN_ATTR,
    PARENT_STATE_ATTR,
    RUN_ATTR,
    SPACE_ATTR,
    SPACE_SHA_ATTR,
    SPACE_SHA_TAG,
    SPACE_TAG,
    TRACKING_URI_ATTR,
)
from deepsports.tracking.runs import RunTracker
from deepsports.tracking.store import call_with_retry
from deepsports.tracking.uris import redact_uri, tracking_uri
from deepsports.tune._optuna_compat import reseed_tpe_sampler
from deepsports.tune.accounting import is_extra
from deepsports.tune.search_space import SearchSpace
from deepsports.tune.settings import PRUNERS

log = logging.getLogger(__name__)

_RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
_SCHEMA_ATTEMPTS = 6


# --------------------------------------------------------------------------------------------
# Storage, sampler, pruner
# --------------------------------------------------------------------------------------------

def storage_label(storage: str | os.PathLike) -> str:
    """The storage as shown in tags and messages (passwords redacted)."""
    return redact_uri(str(storage))


def open_storage(storage: str | os.PathLike, *, heartbeat_interval: int = 60, grace_period: int | None = None,
                 max_retry: int = 3) -> optuna.storages.BaseStorage:
    """A journal file for a plain path; an RDB storage with heartbeat for sqlite/postgresql/mysql URLs."""
    text = str(storage)
    scheme = text.split("://", 1)[0].split("+", 1)[0] if "://" in text else ""
    if scheme and scheme not in _RDB_SCHEMES:
        raise StorageError(f"study storage {storage_label(text)!r}: unsupported scheme {scheme!r} (use a journal "
                           f"file path, or a {', '.join(s + '://' for s in _RDB_SCHEMES)} URL)")
    try:
        if not scheme:
            path = Path(text).expanduser()
            if not path.parent.is_dir():  # a typo in a shared path must not start a fresh study somewhere new
                raise ConfigError(f"study storage {text!r}: the folder {str(path.parent)!r} does not exist: create "
                                  "it first, or fix the path (nothing was created)")
            from deepsports.tune.journal import TornTailJournalBackend

            return optuna.storages.JournalStorage(TornTailJournalBackend(str(path)))
        # SQLite: wait up to 60 s for the write lock instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else None
        with warnings.catch_warnings():  # heartbeat and the retry callback are flagged experimental
            warnings.simplefilter("ignore", ExperimentalWarning)
            from deepsports.tune.recovery import StaleTrialRetry  # recovery imports this module

            retry = StaleTrialRetry(max_retry=max_retry, grace_period=grace_period)
            for attempt in range(_SCHEMA_ATTEMPTS):
                try:
                    return optuna.storages.RDBStorage(text, engine_kwargs=engine_kwargs,
                                                      heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                      heartbeat_stale_trial_callback=retry)
                except sqlalchemy.exc.SQLAlchemyError as exc:
                    # Workers starting together on a fresh database race to create the schema; the
                    # losers find it created when they try again.
                    if attempt == _SCHEMA_ATTEMPTS - 1:
                        raise StorageError(f"cannot open study storage {storage_label(text)!r}: "
                                           f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
                    time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    except ConfigError:
        raise
    except (OSError, ImportError, ValueError) as exc:
        raise StorageError(f"cannot open study storage {storage_label(text)!r}: {exc}") from exc
    raise AssertionError("unreachable")


def worker_seed(seed: int | None, worker_id: int | None) -> int | None:
    """Workers must not share a sampler seed, or their random startup trials would coincide."""
    if seed is None or not worker_id:
        return seed
    return (seed * 1_000_003 + worker_id) % 2**32


def default_worker_id() -> int | None:
    """The SLURM array task (or step rank) this process is, if any."""
    return ClusterEnv.read().worker_id


def worker_label() -> str:
    slurm = ClusterEnv.read().job_label
    return f"{socket.gethostname()}:{os.getpid()}" + (f" slurm {slurm}" if slurm else "")


class _TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random stream for a new trial restarts from ``(seed, k)``, ``k`` the trial's index among the
    study's original trials (retries and re-runs, which sample nothing, do not count).

    A plain seeded sampler draws on from wherever its process left off: a worker restarted after a pause,
    or another worker taking over, would propose other parameters for the next trial than the worker
    never stopped. This way a seeded study's proposals depend only on the seed and on the trials so far.
    """

    def __init__(self, seed: int | None, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        self._study_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        if self._study_seed is None:
            return
        index = sum(t.number < trial.number and not is_extra(t) for t in study.get_trials(deepcopy=False))
        seed = (self._study_seed * 1_000_003 + index) % 2**32
        reseed_tpe_sampler(self, seed)


def sampler_settings(seed: int | None, n_startup_trials: int = 10, constant_liar: bool = True) -> dict[str, Any]:
    """Every TPE setting DeepSports chooses, explicitly, so that a new Optuna's defaults never change a
    study silently (Optuna 5 changed ``constant_liar`` and ``multivariate``). Recorded on the study
    (user attribute ``deepsports.sampler``) and its parent run (tags ``optuna.sampler.<key>``).
    ``seed`` is the study's; each worker samples with :func:`worker_seed` of it. The settings Optuna
    deprecated in 4.x (``consider_prior``, ``prior_weight``, ``consider_magic_clip``, ``consider_endpoints``)
    are left at what the pinned Optuna does (``optuna_version``)."""
    return {"sampler": "TPESampler", "seed": seed, "n_startup_trials": int(n_startup_trials),
            "multivariate": True, "group": True, "constant_liar": bool(constant_liar), "n_ei_candidates": 24,
            "warn_independent_sampling": True, "optuna_version": optuna.__version__}


def make_sampler(seed: int | None, n_startup_trials: int = 10, constant_liar: bool = True
                 ) -> optuna.samplers.TPESampler:
    """TPE, multivariate with groups so that conditional parameters are modelled together, with the
    constant liar for parallel workers (every setting explicit: :func:`sampler_settings`),
    its random stream restarted for every new trial (:class:`_TrialSeededTPESampler`)."""
    settings = sampler_settings(seed, n_startup_trials, constant_liar)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # constant_liar: a trial running in another worker counts as a poor result while its value is
        # unknown, so concurrent workers do not propose the same region (benchmarks/bench_constant_liar.py).
        return _TrialSeededTPESampler(**{k: v for k, v in settings.items() if k not in ("sampler", "optuna_version")})


def make_pruner(name: str, epochs: int | None, startup_trials: int = 3, warmup_epochs: int = 1
                ) -> optuna.pruners.BasePruner:
    """``median`` (prune below the median of completed trials at the same epoch, never in the first
    ``warmup_epochs`` epochs nor before ``startup_trials`` trials completed), ``hyperband``, ``none``."""
    if name == "median":
        # Steps are epochs counted from 1, and Optuna prunes from step == n_warmup_steps on.
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs + 1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs or "auto", reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchSpaceError(f"pruner={name!r}: expected one of {', '.join(PRUNERS)}")


def constant(space: SearchSpace, overrides: Mapping[str, Any], key: str) -> Any:
    """A config value no trial samples: base_config, then fixed, then ``overrides``."""
    if key in space.keys:
        raise SearchSpaceError(f"search space {space.path}: {key} cannot be sampled in a study")
    return {**space.base_values, **space.fixed, **overrides}.get(key, config_fields()[key].default)


# --------------------------------------------------------------------------------------------
# Creating or joining a study
# --------------------------------------------------------------------------------------------

def _create_or_load(name: str, backend: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler,
                    pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, bool]:
    """The study ``name`` and whether this call created it."""
    try:
        return optuna.create_study(storage=backend, study_name=name, direction="maximize", sampler=sampler,
                                   pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner), False


def open_study(name: str, storage: str | os.PathLike, space: SearchSpace, *, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner, overrides: Mapping[str, Any] | None = None,
               parent_tags: Mapping[str, str] | None = None, parent_wait_s: float = 60.0,
               tracker_uri: str | None = None) -> tuple[optuna.Study, str]:
    """Create or join study ``name`` and return it with its MLflow parent run id.

    Joiners wait up to ``parent_wait_s`` for the creator to store the parent id. If the creator died
    in between, a joiner adopts the study: it creates a parent, stores it, re-reads the stored id,
    and deletes its own parent if another adopter's id won.
    """
    label = storage_label(storage)
    backend = storage if isinstance(storage, optuna.storages.BaseStorage) else open_storage(storage)
    experiment = constant(space, overrides or {}, "experiment_name")
    study, created = _create_or_load(name, backend, sampler, pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise StorageError(f"study {name!r} in {label} minimises; DeepSports studies maximise validation "
                           "Spearman: choose another study name")
    tags = {KIND_TAG: "study", OPTUNA_STUDY_NAME_TAG: name, OPTUNA_STORAGE_TAG: label,
            SPACE_TAG: str(space.path), SPACE_SHA_TAG: space.sha256,
            OPTUNA_SAMPLER_TAG: type(sampler).__name__, OPTUNA_PRUNER_TAG: type(pruner).__name__, **(parent_tags or {})}
    from deepsports.tune.parent import check_same_store, record_state, store_label  # (parent imports recovery: us)

    store = tracker_uri or tracking_uri()
    if created:
        attrs = {SPACE_ATTR: str(space.path), SPACE_SHA_ATTR: space.sha256, EXPERIMENT_ATTR: experiment,
                 TRACKING_URI_ATTR: store_label(store), PARENT_STATE_ATTR: "RUNNING"}
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        # Under heavy load this can outlast a joiner's wait, and the joiner adopts the study meanwhile.
        parent = store_parent_run(study, create_parent_run(space, experiment, name, tags, tracker_uri),
                                  tracker_uri, settle_s=0.0)
        log.info("created study %r in %s, MLflow parent run %s", name, label, parent)
        return study, parent
    deadline = time.monotonic() + parent_wait_s
    while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    attrs = study.user_attrs
    if attrs.get(SPACE_SHA_ATTR, space.sha256) != space.sha256:
        raise SearchSpaceError(f"study {name!r} in {label} samples the search space {attrs.get(SPACE_ATTR)} "
                               f"(sha256 {attrs[SPACE_SHA_ATTR][:16]}), but this worker loaded {space.path} "
                               f"(sha256 {space.sha256[:16]}): use the same file, or a new study name")
    check_same_store(study, store)  # before this worker opens (or creates) its own store
    study.set_user_attr(TRACKING_URI_ATTR, store_label(store))  # the same, or a study from before the record
    tracker = RunTracker(tracker_uri)
    if PARENT_RUN_ATTR in attrs:
        parent = attrs[PARENT_RUN_ATTR]
        # A finished study that gets more trials runs again.
        call_with_retry("reopen study run", tracker.uri, tracker.client.update_run, parent, status="RUNNING")
        record_state(study, "RUNNING")
        log.info("joined study %r in %s, MLflow parent run %s", name, label, parent)
        return study, parent
    log.warning("study %r has no MLflow parent run after %.0f s (did its creator die?): adopting it", name,
                parent_wait_s)
    study.set_user_attr(EXPERIMENT_ATTR, experiment)
    return study, store_parent_run(study, create_parent_run(space, experiment, name, tags, tracker_uri), tracker_uri)


def store_parent_run(study: optuna.Study, mine: str, tracker_uri: str | None = None, settle_s: float = 1.0) -> str:
    """Store ``mine`` as the study's parent run unless another process (a slow creator, an adopter)
    stored one while ``mine`` was being made; returns the id every process then uses.

    Storages offer no compare-and-set: read right before writing, and (adopters) re-read after
    ``settle_s`` so that a write that landed in between wins. The losing run is deleted.
    """
    stored = study.user_attrs.get(PARENT_RUN_ATTR)  # read from the storage on every access
    if stored is None:
        study.set_user_attr(PARENT_RUN_ATTR, mine)
        if settle_s > 0:
            time.sleep(settle_s)
        stored = study.user_attrs[PARENT_RUN_ATTR]
    if stored != mine:
        tracker = RunTracker(tracker_uri)
        call_with_retry("delete duplicate parent run", tracker.uri, tracker.client.delete_run, mine)
    return stored


def create_parent_run(space: SearchSpace, experiment: str, name: str, tags: Mapping[str, str],
                      tracker_uri: str | None = None) -> str:
    """The study's MLflow run (left RUNNING); the search-space file and its description are artifacts."""
    tracker = RunTracker(tracker_uri)
    with _without_env_run():
        run_id = tracker.start(experiment_name=experiment, run_name=name, tags=tags, cluster=run_tags())
    tracker.log_text(space.path.read_text(), f"search_space/{space.path.name}")
    tracker.log_text(space.describe() + "\n", "search_space/describe.txt")
    return run_id


@contextlib.contextmanager
def _without_env_run():
    """Hide ``$MLFLOW_RUN_ID`` (set by ``mlflow run``): every worker shares the parent, so no worker's
    own entry-point run may become it."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass
class StudySummary:
    study_name: str
    parent_run_id: str
    states: dict[str, int]               # the whole study: COMPLETE/PRUNED/FAIL/RUNNING/WAITING -> count
    best_value: float | None
    best_number: int | None
    best_params: dict[str, Any] | None
    best_run_id: str | None
    trials_run: int = 0                  # by this worker (tune only)


def summarize(study: optuna.Study, trials_run: int = 0) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return StudySummary(study_name=study.study_name, parent_run_id=study.user_attrs.get(PARENT_RUN_ATTR, ""),
                        states={s.name: sum(t.state == s for t in trials) for s in TrialState},
                        best_value=best.value if best else None, best_number=best.number if best else None,
                        best_params=dict(best.params) if best else None,
                        best_run_id=best.user_attrs.get(RUN_ATTR) if best else None, trials_run=trials_run)
