"""What MLflow's system metrics cost a training run (``system_metrics_interval_s``, default 10 s).

In one process, on a real SQLite store: the time one sample takes in the monitor's thread (psutil's
CPU, memory, disk and network reads, GPU where present, the run-status query the monitor makes
before each sample, and the ``log_batch`` of the sample), as wall and CPU seconds. The monitor runs
in its own thread: its waits (the store's lock, the disk) do not stop training, its CPU time (under
the GIL) does. The overhead per epoch is then ``CPU seconds per sample / interval``, whatever the
epoch's length (the monitor samples at a fixed rate). A second figure runs the tiny model's training
step for the same time with and without a monitor sampling every second (10x the default rate),
alternating, and compares steps per second.

``python benchmarks/bench_system_metrics.py [--samples 20] [--seconds 6] [--json out.json]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import finish, machine, median, print_machine


def _sample_cost(uri: str, run_id: str, samples: int) -> dict[str, float]:
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1, tracking_uri=uri)
    client = MlflowClient(uri)
    monitor.collect_metrics()  # psutil's first CPU reading is a baseline
    walls, cpus = [], []
    for _ in range(samples):
        wall, cpu = time.perf_counter(), time.thread_time()
        monitor.collect_metrics()
        client.get_run(run_id)  # the status check the monitor's loop makes before each sample
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
        time.sleep(0.2)
    return {"wall_s_per_sample": median(walls), "cpu_s_per_sample": median(cpus),
            "monitors": [type(m).__name__ for m in monitor.monitors]}


def _steps_per_s(seconds: float) -> float:
    import torch

    from deepsports.config import build_config
    from deepsports.model import build_model
    from tests.e2e_helpers import TINY

    config = build_config(TINY)
    model = build_model(config).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    video = torch.rand(config.batch_size, 3, config.frame_num, config.spatial_size, config.spatial_size)
    target = torch.rand(config.batch_size, 2)
    steps, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        loss = torch.nn.functional.mse_loss(model(video), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    return steps / seconds


def _ab(uri: str, seconds: float, rounds: int) -> dict[str, float]:
    from deepsports.tracking.runs import RunTracker

    _steps_per_s(1.0)  # warm-up
    off, on = [], []
    for _ in range(rounds):
        off.append(_steps_per_s(seconds))
        tracker = RunTracker(uri)
        tracker.start(experiment_name="bench", run_name="system-metrics-1s", system_metrics_interval_s=1)
        on.append(_steps_per_s(seconds))
        tracker.end("FINISHED")
    return {"steps_per_s_off": median(off), "steps_per_s_on_1s": median(on),
            "slowdown_at_1s": 1 - median(on) / median(off)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per A/B leg")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    from deepsports.tracking.runs import RunTracker

    with tempfile.TemporaryDirectory(prefix="bench-system-metrics-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        tracker = RunTracker(uri)
        run_id = tracker.start(experiment_name="bench", run_name="system-metrics-cost")
        cost = _sample_cost(uri, run_id, args.samples)
        tracker.end("FINISHED")
        ab = _ab(uri, args.seconds, args.rounds)
    ratio_default = cost["cpu_s_per_sample"] / 10.0
    print(f"one sample ({', '.join(cost['monitors'])}): {1000 * cost['wall_s_per_sample']:.1f} ms wall, "
          f"{1000 * cost['cpu_s_per_sample']:.1f} ms CPU (median of {args.samples})")
    print(f"overhead per epoch at the default 10 s interval: {100 * ratio_default:.2f} % (CPU per sample / interval)")
    print(f"A/B, tiny training step, monitor every 1 s (10x the default): {ab['steps_per_s_off']:.2f} -> "
          f"{ab['steps_per_s_on_1s']:.2f} steps/s ({100 * ab['slowdown_at_1s']:+.1f} %, median of {args.rounds})")
    finish({"machine": info, **cost, "overhead_ratio_at_10s": ratio_default, **ab}, args.json)


if __name__ == "__main__":
    main()
