"""``deepsports best``: the best trial of a study, its config as an experiment file, and the study plots.

The exported YAML lists the trial's config keys that differ from the defaults (without the
trial's own checkpoint directory and run name), so ``deepsports train --config <file>`` trains
that configuration as a fresh run. The plots (Optuna's visualisation module: optimisation history,
parameter importances, parallel coordinates, intermediate values) are written as PNG (matplotlib)
and, where plotly is installed, as HTML, and logged to the study's parent run under ``study_plots/``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from deepsports.config import Config, build_config, config_fields
from deepsports.errors import StorageError
from deepsports.fileio import atomic_write
from deepsports.tags import (
    CONFIG_ATTR,
    OPTUNA_STUDY_NAME_TAG,
    PARENT_RUN_ATTR,
    RETRAIN_OF_RUN_TAG,
    RETRAIN_OF_TRIAL_TAG,
    RUN_ATTR,
)
from deepsports.tracking.runs import RunTracker
from deepsports.tracking.store import call_with_retry
from deepsports.tracking.uris import sqlite_path
from deepsports.tune.study import open_storage, storage_label

log = logging.getLogger(__name__)

#: Keys that belong to one trial's run, not to the configuration it trained.
#: Keys of a trial's config that describe the trial's run, not the configuration: `best` resets them.
_RUN_KEYS = ("checkpoint_dir", "run_name", "log_model", "log_checkpoint")
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


@dataclass
class BestTrial:
    study_name: str
    number: int
    value: float
    params: dict[str, Any]
    run_id: str | None
    parent_run_id: str | None
    config: Config


def load_existing_study(name: str, storage: str | os.PathLike) -> optuna.Study:
    """A study that must already exist (``deepsports best`` never creates one, nor an empty journal file)."""
    if "://" not in str(storage) and not Path(storage).expanduser().is_file():
        raise StorageError(f"no study storage at {str(storage)!r}: the journal file does not exist "
                           "(give --storage as used by `deepsports tune`)")
    database = sqlite_path(str(storage))
    if database is not None and not database.expanduser().is_file():  # opening it would create an empty one
        raise StorageError(f"no study storage at {storage_label(storage)!r}: the database file does not exist "
                           "(give --storage as used by `deepsports tune`)")
    backend = open_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]
    if name not in names:
        raise StorageError(f"no study {name!r} in {storage_label(storage)} "
                           f"(studies there: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=backend)


def best_trial(study: optuna.Study) -> BestTrial:
    """The COMPLETE trial with the highest validation Spearman (ties: the earliest)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise StorageError(f"study {study.study_name!r} has no completed trial yet")
    best = max(complete, key=lambda t: (t.value, -t.number))
    return BestTrial(study_name=study.study_name, number=best.number, value=float(best.value), params=dict(best.params),
                     run_id=best.user_attrs.get(RUN_ATTR), parent_run_id=study.user_attrs.get(PARENT_RUN_ATTR),
                     config=trial_config(best))


def trial_config(trial: FrozenTrial) -> Config:
    """The config a trial trained (recorded by :func:`deepsports.tune.tune` when the trial started)."""
    if CONFIG_ATTR not in trial.user_attrs:
        raise StorageError(f"trial {trial.number} has no recorded config (user attribute {CONFIG_ATTR!r}); "
                           "was it run by deepsports tune?")
    defaults = config_fields()
    return build_config({**trial.user_attrs[CONFIG_ATTR], **{k: defaults[k].default for k in _RUN_KEYS}})


def export_best(best: BestTrial, path: str | os.PathLike) -> Path:
    """Write the best trial's config (keys that differ from the defaults) as an experiment YAML."""
    path = Path(path)
    defaults = build_config({}).to_dict()
    values = {k: v for k, v in best.config.to_dict().items() if v != defaults[k]}
    header = (f"# Best trial of study {best.study_name!r}: trial {best.number}, validation Spearman {best.value:.4f}\n"
              f"# MLflow run {best.run_id} (study run {best.parent_run_id}). Train it with\n"
              f"#   deepsports train --config {path}\n")
    text = header + yaml.safe_dump(values, sort_keys=False)
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def _plotters() -> dict[str, Callable]:
    from optuna.visualization import matplotlib as mpl

    return {"optimization_history": mpl.plot_optimization_history, "param_importances": mpl.plot_param_importances,
            "parallel_coordinate": mpl.plot_parallel_coordinate, "intermediate_values": mpl.plot_intermediate_values}


def write_study_plots(study: optuna.Study, out_dir: str | os.PathLike) -> list[Path]:
    """PNG (and HTML where plotly is installed) of each plot in :data:`PLOTS` that the study supports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():  # Optuna's matplotlib plots are flagged experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, plot in _plotters().items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need two completed trials
                log.info("plot %s skipped: %s", name, exc)
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(figure)
            written.append(out / f"{name}.png")
            written += _html(study, name, out)
    return written


def _html(study: optuna.Study, name: str, out: Path) -> list[Path]:
    try:
        import plotly  # noqa: F401  (optional: optuna's interactive plots need it)
    except ImportError:
        return []
    from optuna import visualization

    try:
        # plotly.js from its CDN: inlined it makes every file 4.8 MB (the PNGs work offline).
        getattr(visualization, f"plot_{name}")(study).write_html(out / f"{name}.html", include_plotlyjs="cdn")
    except (ValueError, RuntimeError) as exc:
        log.info("plot %s (HTML) skipped: %s", name, exc)
        return []
    return [out / f"{name}.html"]


def log_study_plots(study: optuna.Study, tracker_uri: str | None = None) -> list[str]:
    """Write the plots and log them to the study's parent run under ``study_plots/``."""
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent is None:
        raise StorageError(f"study {study.study_name!r} has no MLflow parent run (user attribute {PARENT_RUN_ATTR!r})")
    tracker = RunTracker(tracker_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_study_plots(study, tmp)
        if files:
            call_with_retry("log study plots", tracker.uri, tracker.client.log_artifacts, parent, tmp,
                                     "study_plots")
    return [f"study_plots/{f.name}" for f in files]


def retrain_best(best: BestTrial, *, epochs: int | None = None, overrides: dict[str, Any] | None = None,
                 train_fn: Callable[..., Any] | None = None, **train_kwargs: Any):
    """Train the best config again (``evaluate: true``) as a new run linked to the study's parent."""
    if train_fn is None:
        from deepsports.train.loop import train as train_fn
    changes = {"evaluate": True, "run_name": f"{best.study_name}-best-retrain", **(overrides or {})}
    if epochs is not None:
        changes["epochs"] = epochs
    config = best.config.replace(**changes)
    tags = {OPTUNA_STUDY_NAME_TAG: best.study_name, RETRAIN_OF_TRIAL_TAG: str(best.number),
            RETRAIN_OF_RUN_TAG: str(best.run_id)}
    return train_fn(config, parent_run_id=best.parent_run_id, tags=tags, **train_kwargs)
