"""The ``tune`` options that the command line needs before anything heavy is imported (stdlib only:
``deepsports --help`` and ``tune --workers N`` read them without importing optuna, mlflow or torch)."""

from __future__ import annotations

PRUNERS = ("median", "hyperband", "none")
DEFAULT_STORAGE = "optuna-journal.log"
