"""Logging a model to an MLflow run: ``mlflow.pytorch.log_model`` (torch.export by default) with a
signature, an input example and explicit pip requirements, into a LoggedModel of the run's experiment.
"""

from __future__ import annotations

import contextlib
import os

import mlflow
import numpy as np

from deepsports.tracking import uris
from deepsports.tracking.store import RetryPolicy, call_with_retry


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """MLflow's model logging reads the process-wide tracking URI; point it at ``uri``, then restore.

    ``mlflow.set_tracking_uri`` mirrors its value into ``$MLFLOW_TRACKING_URI``. Afterwards MLflow's own
    setting is unset again and the variable holds what it held before, so ``mlflow.get_tracking_uri()``
    answers as it did (a setting left behind would shadow a later change of the variable).
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unsets the variable too
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _default_pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    import mlflow.pytorch

    pins = list(mlflow.pytorch.get_default_pip_requirements())
    for package in ("numpy", "einops", "timm"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{package}=={version(package)}")
    return pins


def log_model(model, example_input, run_id: str, *, tracking_uri: str | None = None, name: str = "model",
              serialization_format: str = "pt2", pip_requirements: list[str] | None = None,
              code_paths: list[str] | None = None, retry: RetryPolicy | None = None) -> str:
    """Log ``model`` (an ``nn.Module`` on the CPU, in eval mode) with ``mlflow.pytorch.log_model``.

    ``example_input``: a ``(1, C, T, H, W)`` tensor or float32 array; the signature is inferred from it
    and the model's ``(1, 2)`` output, with a variable batch dimension. Returns the model URI
    (``models:/<id>``), loadable with ``mlflow.pytorch.load_model`` and ``mlflow.pyfunc.load_model``.

    ``serialization_format``: "pt2" (default; torch.export: loads without unpickling and without our
    code, dynamic batch; ~6 s more than pickle on the tiny model, 2 loaded cores) or "pickle" (loading
    unpickles, so it can run arbitrary code, and MLflow warns so; the model's classes must be
    importable: pass ``code_paths=[<deepsports package dir>]`` to ship them).
    Explicit ``pip_requirements`` (default: MLflow's torch pins + numpy/einops/timm) skip MLflow's
    requirement inference, which re-imports the model in a subprocess.
    No fluent run is opened: the LoggedModel is created in the run's experiment with ``model_id``.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    uri = tracking_uri or uris.tracking_uri()
    example = example_input.detach().cpu().float().numpy() if hasattr(example_input, "detach") \
        else np.asarray(example_input, dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).detach().cpu().float().numpy()
    signature = infer_signature(example, output)
    if serialization_format == "pt2" and example.shape[0] == 1:
        # torch.export turns a size-1 dimension into a constant; two rows keep the batch size free.
        example = np.concatenate([example, example])
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = call_with_retry("get run", uri, client.get_run, run_id, policy=retry)
    logged = call_with_retry("create logged model", uri, client.create_logged_model, run.info.experiment_id,
                             name=name, source_run_id=run_id, params=dict(run.data.params), policy=retry)
    with global_tracking_uri(uri):
        info = call_with_retry("log model", uri, mlflow.pytorch.log_model, model, name=name, signature=signature,
                               input_example=example, model_id=logged.model_id, run_id=run_id,
                               serialization_format=serialization_format,
                               pip_requirements=pip_requirements or _default_pip_requirements(),
                               code_paths=code_paths, policy=retry)
    return info.model_uri
