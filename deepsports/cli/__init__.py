"""Command line: ``deepsports`` parses arguments, builds the config, calls one library function and maps
the library's exceptions to exit codes (the only place that exits).
The console entry point is ``deepsports.cli.main:main``; ``python -m deepsports.cli`` runs it too.

The public names below load their module on first use (PEP 562), so importing the package stays
cheap: ``deepsports --help`` imports neither torch nor mlflow.
"""

from __future__ import annotations

from deepsports._lazy import lazy_exports

_EXPORTS = {
    'build_parser': 'main',
    'config_from_args': 'config_args',
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
