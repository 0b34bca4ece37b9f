"""The model registry: a run's logged model as a version of a registered model, and the ``champion`` alias.

``deepsports best STUDY --retrain --register NAME`` registers the retrained run's model (logged with
torch.export, see :func:`deepsports.tracking.models.log_model`), tags the version with the study, the
trial and the run's metrics, and moves the alias ``champion`` to it only when its validation
Spearman (``best_val_spearman``) beats the current champion's: a retraining that came out worse never
replaces the model users load as ``models:/NAME@champion``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from deepsports.errors import StorageError
from deepsports.tags import MODEL_URI_TAG, VERSION_METRIC_PREFIX, VERSION_RUN_TAG
from deepsports.tracking.store import call_with_retry
from deepsports.tracking.uris import allow_file_store, redact_uri, tracking_uri

log = logging.getLogger(__name__)

#: The alias that names the best registered version (what ``models:/NAME@champion`` loads).
CHAMPION_ALIAS = "champion"
#: The run metric that decides the champion (higher is better), copied to the version's tags.
CHAMPION_METRIC = "best_val_spearman"


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    value: float
    champion_version: str
    champion_value: float
    promoted: bool  # whether ``champion`` moved to this version


def register_run_model(run_id: str, name: str, *, tags: Mapping[str, str] | None = None,
                       uri: str | None = None) -> Registered:
    """Register the model logged by run ``run_id`` as a new version of ``name`` (created when missing).

    The version is tagged with ``tags`` (e.g. study and trial), the run id and every run metric
    (``metric.<key>``; names in :mod:`deepsports.tags`); ``champion`` moves to it when its
    ``best_val_spearman`` is greater than the current champion's, or when there is none. Raises
    :class:`StorageError` when the run logged no model.
    """
    uri = uri or tracking_uri()
    allow_file_store(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = call_with_retry("get run", uri, client.get_run, run_id)
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise StorageError(f"run {run_id} in {redact_uri(uri)} logged no model (log_model=false?): nothing to register")
    metrics = run.data.metrics
    if CHAMPION_METRIC not in metrics:
        raise StorageError(f"run {run_id} has no {CHAMPION_METRIC} metric: it did not finish training")
    value = float(metrics[CHAMPION_METRIC])
    try:
        call_with_retry("create registered model", uri, client.create_registered_model, name)
    except StorageError as exc:
        if getattr(exc.__cause__, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**dict(tags or {}), VERSION_RUN_TAG: run_id,
                    **{f"{VERSION_METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items() if not k.startswith("system/")}}
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    from deepsports.tracking.models import global_tracking_uri

    with global_tracking_uri(uri):  # MLflow resolves the models:/ source through the process-wide URI
        version = call_with_retry("create model version", uri, client.create_model_version, name, model_uri,
                                  run_id=run_id, tags=version_tags, model_id=model_id)
    champion = _champion(client, uri, name)
    if champion is None or value > champion[1]:
        call_with_retry("set alias", uri, client.set_registered_model_alias, name, CHAMPION_ALIAS, version.version)
        log.info("registered %s version %s (%s %.4f): now %s%s", name, version.version, CHAMPION_METRIC, value,
                 CHAMPION_ALIAS, "" if champion is None else f" (was version {champion[0]}, {champion[1]:.4f})")
        return Registered(name, str(version.version), value, str(version.version), value, True)
    log.info("registered %s version %s (%s %.4f): %s stays version %s (%.4f)", name, version.version,
             CHAMPION_METRIC, value, CHAMPION_ALIAS, champion[0], champion[1])
    return Registered(name, str(version.version), value, champion[0], champion[1], False)


def _champion(client: mlflow.MlflowClient, uri: str, name: str) -> tuple[str, float] | None:
    """(version, value) of the version the alias names, or None when no version holds it."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise StorageError(f"get alias {CHAMPION_ALIAS} of {name} failed on {redact_uri(uri)}: {exc}") from exc
    return str(version.version), float(version.tags[f"{VERSION_METRIC_PREFIX}{CHAMPION_METRIC}"])


def resolve_registered_run(model_uri: str, uri: str | None = None) -> str:
    """The run id behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (a registered version)."""
    uri = uri or tracking_uri()
    allow_file_store(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = call_with_retry("get model version", uri, client.get_model_version_by_alias, name, alias)
    elif "/" in ref:
        name, number = ref.rsplit("/", 1)
        version = call_with_retry("get model version", uri, client.get_model_version, name, number)
    else:
        raise StorageError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    run_id = version.run_id or version.tags.get(VERSION_RUN_TAG)
    if not run_id:
        raise StorageError(f"{model_uri} (version {version.version}) names no run")
    return run_id


def register_retrained(run_id: str, name: str, study_name: str, trial_number: int, uri: str | None = None) -> dict:
    """``deepsports best --retrain --register NAME``: register the retrained run, tagged with its study and
    trial; returns what the command prints."""
    from deepsports.tags import VERSION_STUDY_TAG, VERSION_TRIAL_TAG

    done = register_run_model(run_id, name, tags={VERSION_STUDY_TAG: study_name, VERSION_TRIAL_TAG: str(trial_number)},
                              uri=uri)
    return {"name": done.name, "version": done.version, "best_val_spearman": done.value,
            "champion": done.champion_version, "champion_moved": done.promoted,
            "load": f"models:/{done.name}@{CHAMPION_ALIAS}"}
