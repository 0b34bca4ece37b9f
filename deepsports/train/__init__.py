"""Training: the loop, losses, metrics, optimiser, evaluation, reporting, checkpoints, runtime and DDP.

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

from deepsports._lazy import lazy_exports

_EXPORTS = {
    'CheckpointManager': 'checkpoints',
    'DistEnv': 'distributed',
    'EpochReport': 'state',
    'EpochSampler': 'evaluation',
    'GlobalBatchModel': 'distributed',
    'Predictions': 'evaluation',
    'Runtime': 'runtime',
    'ShardedBatchSampler': 'distributed',
    'TrainHooks': 'state',
    'TrainResult': 'loop',
    'any_rank': 'distributed',
    'aqa_loss': 'losses',
    'barrier': 'distributed',
    'broadcast_object': 'distributed',
    'build_optimizer': 'optim',
    'build_scheduler': 'optim',
    'capture_rng_state': 'checkpoints',
    'detect': 'distributed',
    'eval_loader': 'evaluation',
    'final_scores': 'losses',
    'gather_rows': 'distributed',
    'load_checkpoint': 'checkpoints',
    'load_training_checkpoint': 'loop',
    'log_final_artifacts': 'reporting',
    'make_loader': 'evaluation',
    'predict': 'evaluation',
    'regression_metrics': 'metrics',
    'relative_l2': 'metrics',
    'restore_rng_state': 'checkpoints',
    'save_checkpoint': 'checkpoints',
    'seed_everything': 'runtime',
    'select_runtime': 'runtime',
    'setup': 'distributed',
    'setup_logging': 'runtime',
    'shard_sizes': 'distributed',
    'soft_spearman': 'losses',
    'spearman': 'metrics',
    'steps_per_epoch': 'distributed',
    'teardown': 'distributed',
    'train': 'loop',
    'wrap_ddp': 'distributed',
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
