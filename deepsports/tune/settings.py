"""``TuneSettings``: one tuning worker's options, each defined once.

The ``deepsports tune`` flags (:mod:`deepsports.cli.studies`) and the MLproject's ``tune`` entry point
(:mod:`deepsports.cli.mlproject`) are derived from the fields' :class:`TuneOption` metadata, as the
config flags are derived from the config fields. Standard library only (plus config/errors), so that
``deepsports --help`` and ``tune --workers N`` read it without importing optuna, mlflow or torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from deepsports.errors import ConfigError
from deepsports.tune.checks import CAUSES, check_rerun, check_study_name  # standard library only, like this module

PRUNERS = ("median", "hyperband", "none")
DEFAULT_STORAGE = "optuna-journal.log"
#: The environment variable that overrides the default study storage of ``tune`` and ``best``.
STORAGE_ENV = "DEEPSPORTS_STUDY_STORAGE"
#: Set by ``deepsports tune --workers N`` for its workers: its own pid (see deepsports.tune.recovery.task_identity).
WORKER_GROUP_ENV = "DEEPSPORTS_TUNE_WORKER_GROUP"

#: Option kinds: how a flag's text becomes the field's value (the CLI owns the parsing).
#: ``count``/``seconds``: a number >= 0, 0 meaning no limit (None); ``overrides``: repeated KEY=VALUE;
#: ``switch``: a flag without a value (true when given); ``list``: a repeatable value (a tuple, empty when absent).
OPTION_KINDS = ("path", "text", "int", "count", "seconds", "choice", "overrides", "switch", "list")


@dataclass(frozen=True)
class TuneOption:
    """How one :class:`TuneSettings` field appears on the command line and in the MLproject."""

    flag: str                        # "--study"; "" for the positional search space
    kind: str                        # one of OPTION_KINDS
    help: str
    cli_default: Any = None          # what the command line passes when the flag is absent ...
    env: str | None = None           # ... unless this environment variable is set
    required: bool = False
    hidden: bool = False             # set by ``tune --workers N`` for its workers, not by users
    choices: tuple[str, ...] = ()
    project_default: str | None = None  # the MLproject ``tune`` parameter's default; None: not a parameter

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise ValueError(f"TuneOption kind {self.kind!r}: expected one of {', '.join(OPTION_KINDS)}")

    @property
    def param(self) -> str:
        """The MLproject parameter name of a flag (``--n-trials`` -> ``n_trials``); "" for the positional."""
        return self.flag.removeprefix("--").replace("-", "_")


def _option(default: Any = None, **option: Any) -> Any:
    """A dataclass field with its :class:`TuneOption`."""
    return field(default=default, metadata={"option": TuneOption(**option)})


@dataclass(frozen=True)
class TuneSettings:
    """One worker's options (the CLI and MLproject ``tune`` options)."""

    search_space: str | os.PathLike = field(metadata={"option": TuneOption(
        flag="", kind="path", help="search-space YAML: a path or a name under search_spaces/ (e.g. head)",
        project_default="search_spaces/demo.yaml")})
    study_name: str = field(metadata={"option": TuneOption(
        flag="--study", kind="text", required=True, help="study name (created, or joined when it exists)",
        project_default="demo")})
    storage: str = _option(DEFAULT_STORAGE, flag="--storage", kind="text", cli_default=DEFAULT_STORAGE, env=STORAGE_ENV,
                           help="Optuna storage: a journal file path (default, safe on shared file systems), "
                                f"sqlite:///... or postgresql://... [${STORAGE_ENV} or {DEFAULT_STORAGE}]",
                           project_default=DEFAULT_STORAGE)
    n_trials: int | None = _option(flag="--n-trials", kind="count", help="trials this worker runs (0 = no limit)",
                                   project_default="4")  # this worker
    max_trials: int | None = _option(flag="--max-trials", kind="count", project_default="0",
                                     help="trials of the whole study, counted across all workers (0 = no limit)")
    timeout: float | None = _option(flag="--timeout", kind="seconds", project_default="0",
                                    help="seconds this worker runs (0 = no limit)")
    pruner: str = _option("median", flag="--pruner", kind="choice", choices=PRUNERS, cli_default="median",
                          help="pruner [median]", project_default="median")
    seed: int | None = _option(flag="--seed", kind="int", cli_default=0, project_default="0",
                               help="sampler seed, mixed with the worker id [0]")
    worker_id: int | None = _option(flag="--worker-id", kind="int", hidden=True,
                                    help="default: $SLURM_ARRAY_TASK_ID, $SLURM_PROCID")
    n_startup_trials: int = 10          # TPE: random trials before modelling
    pruner_startup_trials: int = 3      # median: completed trials before anything is pruned
    pruner_warmup_epochs: int = 1       # median: epochs never pruned
    heartbeat_interval: int = _option(60, flag="--heartbeat", kind="int", cli_default=60,
                                      help="seconds between the heartbeats of a running trial (every storage) [60]")
    grace_period: int | None = _option(flag="--grace-period", kind="int",
                                       help="a RUNNING trial without heartbeat for this long is failed and retried with "
                                            "the same params, resuming its checkpoint (a paused, preempted trial is "
                                            "WAITING and never expires) [2 x heartbeat]")
    max_retry: int = _option(3, flag="--max-retry", kind="int", cli_default=3, help="re-runs of a dead worker's trial [3]")
    checkpoint_root: str | os.PathLike | None = None  # default: config checkpoint_dir, else checkpoints/
    overrides: Mapping[str, Any] = field(default_factory=dict, metadata={"option": TuneOption(
        flag="--set", kind="overrides", cli_default=(),
        help="config override for every trial (e.g. --set epochs=3 --set cache_dir=/scratch/x)")})
    parent_wait_s: float = 60.0
    keep_trial_artifacts: bool = _option(False, flag="--keep-trial-artifacts", kind="switch",
                                         help="log every trial's best.pt and model to MLflow (default: they stay in the "
                                              "trial's checkpoint folder; `deepsports best --retrain` logs the best "
                                              "config's model)")
    # Targeted re-launch (deepsports.tune.accounting): queue the failed trials' params again, sample nothing new.
    rerun_failed: bool = _option(False, flag="--rerun-failed", kind="switch",
                                 help="queue the params of the study's failed trials again as new linked trials (fresh "
                                      "training), run those and sample nothing new")
    rerun_causes: tuple[str, ...] = _option((), flag="--cause", kind="list", cli_default=(),
                                            help="with --rerun-failed: only trials failed for this cause (repeatable; "
                                                 f"{', '.join(CAUSES)}) [every cause but not_run]")

    def __post_init__(self) -> None:
        object.__setattr__(self, "rerun_causes", check_rerun(self.rerun_failed, self.rerun_causes))
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner={self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        for name in ("n_trials", "max_trials"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: expected a positive number of trials (or none)")
        check_study_name(self.study_name, "study name")
        if self.heartbeat_interval < 1:
            raise ConfigError(f"heartbeat_interval={self.heartbeat_interval}: expected seconds >= 1")
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"grace_period={self.grace_period}: expected more seconds than heartbeat_interval="
                              f"{self.heartbeat_interval} (a live trial beats once per interval)")

    @property
    def grace(self) -> float:
        return float(self.grace_period or 2 * self.heartbeat_interval)


def tune_options() -> dict[str, TuneOption]:
    """The :class:`TuneSettings` fields that are command-line options, in order: field name -> option."""
    return {f.name: f.metadata["option"] for f in fields(TuneSettings) if "option" in f.metadata}
