"""``deepsports tune|best|submit``: the study and SLURM subcommands (parsers + calls into the library)."""

from __future__ import annotations


def register(sub) -> None:
    """Add the study and SLURM subcommands to the ``deepsports`` parser."""
