"""Tracking: MLflow runs (runs.py), logged models (models.py), the tracking store's WAL and retries (store.py)
and URIs (uris.py).

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

from deepsports._lazy import lazy_exports

_EXPORTS = {
    'MetricBuffer': 'runs',
    'NullTracker': 'runs',
    'RetryPolicy': 'store',
    'RunTracker': 'runs',
    'allow_file_store': 'uris',
    'call_with_retry': 'store',
    'default_retry_policy': 'store',
    'enable_sqlite_wal': 'store',
    'environment_tags': 'runs',
    'is_transient': 'store',
    'log_model': 'models',
    'redact_uri': 'uris',
    'sqlite_path': 'uris',
    'tracking_uri': 'uris',
    'register_run_model': 'registry',
    'resolve_registered_run': 'registry',
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
