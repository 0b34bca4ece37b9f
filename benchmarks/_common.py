"""Shared bits of the benchmark scripts: the machine line, load averages and the ``--json`` output.

Not a benchmark itself (``run_all.py`` runs ``bench_*.py`` only).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/bench_x.py` without an installed package
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on (what SLURM/cgroups grant), as ``deepsports prepare`` counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine(**extra: Any) -> dict[str, Any]:
    """nproc, CPU model, torch version and the 1-minute load average now (call it before measuring)."""
    import torch

    info: dict[str, Any] = {"nproc": os.cpu_count() or 0, "cpu": cpu_model(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "loadavg_before": load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info.update(extra)
    return info


def print_machine(info: dict[str, Any]) -> None:
    print("machine: " + ", ".join(f"{key}={value}" for key, value in info.items()), flush=True)


def finish(results: dict[str, Any], json_path: str | os.PathLike | None) -> None:
    """Record the load average after the run, print it, and write ``results`` to ``json_path`` if given."""
    results["machine"]["loadavg_after"] = load_average()
    print(f"load average (1 min): {results['machine']['loadavg_before']} before -> "
          f"{results['machine']['loadavg_after']} after", flush=True)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with an error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value
