"""SLURM: job scripts and submission (jobs.py), cluster profiles (profile.py) and the preemption flag.

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    'KINDS': 'jobs',
    'PROFILE_DIR': 'jobs',
    'PreemptionFlag': 'preemption',
    'SlurmError': 'jobs',
    'SlurmProfile': 'jobs',
    'TEMPLATE_DIR': 'jobs',
    'build_profile': 'jobs',
    'load_profile': 'jobs',
    'render_script': 'jobs',
    'requeue_self': 'jobs',
    'resolve_profile_path': 'jobs',
    'slurm_env': 'jobs',
    'submit': 'jobs',
    'task_job_id': 'jobs',
    'time_limit_seconds': 'jobs',
    'watch_hints': 'jobs',
    'worker_command': 'jobs',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
