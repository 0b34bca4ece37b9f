"""Studies: Optuna trial workers, study storage and recovery, search spaces and study reports.

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

from deepsports._lazy import lazy_exports

_EXPORTS = {
    'AttemptLedger': 'accounting',
    'CAUSES': 'checks',
    'enqueue_reruns': 'accounting',
    'publish_status': 'status',
    'render_text': 'status',
    'study_status': 'status',
    'work_left': 'accounting',
    'BestTrial': 'report',
    'PARAM_TYPES': '_space_format',
    'Param': '_space_format',
    'PrunedTrial': 'worker',
    'Range': '_space_format',
    'SearchSpace': 'search_space',
    'StaleTrialRetry': 'recovery',
    'StudySummary': 'study',
    'TOP_LEVEL_KEYS': '_space_format',
    'TrialHeartbeat': 'recovery',
    'TuneSettings': 'settings',
    'tune_options': 'settings',
    'best_trial': 'report',
    'claim_waiting': 'recovery',
    'constant': 'study',
    'create_parent_run': 'study',
    'default_worker_id': 'study',
    'end_dead_run': 'recovery',
    'export_best': 'report',
    'find_trial_run': 'recovery',
    'last_sign_of_life': 'accounting',
    'load_existing_study': 'report',
    'load_search_space': 'search_space',
    'log_study_plots': 'report',
    'make_pruner': 'study',
    'make_sampler': 'study',
    'open_storage': 'study',
    'open_study': 'study',
    'pause_trial': 'recovery',
    'resolve_search_space_path': 'search_space',
    'retrain_best': 'report',
    'retried_from': 'accounting',
    'retry_trial': 'recovery',
    'storage_label': 'study',
    'summarize': 'study',
    'sweep': 'recovery',
    'sweep_stale_journal_trials': 'recovery',
    'task_identity': 'recovery',
    'trial_config': 'report',
    'tune': 'worker',
    'uses_optuna_heartbeat': 'recovery',
    'worker_label': 'study',
    'worker_seed': 'study',
    'write_study_plots': 'report',
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
