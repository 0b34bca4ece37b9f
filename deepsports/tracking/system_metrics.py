"""MLflow's system metrics (``system/*``) on a DeepSports run: CPU, memory, disk, network, and GPU
utilisation and memory where nvidia-ml-py finds an NVIDIA GPU (``system_metrics_interval_s``; overhead:
benchmarks/README.md)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def start_system_metrics(run_id: str, uri: str, interval_s: float, resumed: bool):
    """Start MLflow's monitor on ``run_id`` (a sample every ``interval_s`` seconds, logged at once); returns
    it (``finish()`` stops it and flushes). Samples count from 1, as epochs do; a resumed run continues
    after its last logged sample."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                   resume_logging=resumed, tracking_uri=uri)
    # Not from 0: MLflow's log_model re-logs the run's step-0 points for the logged model, which a file
    # store would append as duplicates.
    monitor._logging_step = max(monitor._logging_step, 1)
    monitor.start()
    log.debug("system metrics every %g s (%s)", interval_s, ", ".join(type(m).__name__ for m in monitor.monitors))
    return monitor
