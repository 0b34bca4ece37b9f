"""Command line: ``deepsports`` parses arguments, builds the config, calls one library function and maps
the library's exceptions to exit codes (the only place that exits).
The console entry point is ``deepsports.cli.main:main``; ``python -m deepsports.cli`` runs it too.

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    'build_parser': 'main',
    'config_from_args': 'main',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
