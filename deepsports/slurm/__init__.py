"""SLURM: job scripts and submission (jobs.py), cluster profiles (profile.py) and what a stopped job does (preemption.py).

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

from deepsports._lazy import lazy_exports

_EXPORTS = {
    'KINDS': 'jobs',
    'PROFILE_DIR': 'profile',
    'SlurmError': 'jobs',
    'SlurmProfile': 'profile',
    'TEMPLATE_DIR': 'jobs',
    'build_profile': 'profile',
    'job_info': 'jobs',
    'load_profile': 'profile',
    'preemptible': 'preemption',
    'render_script': 'jobs',
    'requeue_self': 'jobs',
    'resolve_profile_path': 'profile',
    'slurm_env': 'jobs',
    'submit': 'jobs',
    'task_job_id': 'jobs',
    'time_limit_seconds': 'profile',
    'watch_hints': 'jobs',
    'worker_command': 'jobs',
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
