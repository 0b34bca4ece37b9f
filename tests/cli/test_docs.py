"""The README says what the code does: its first commands, and the generated argument table."""

from __future__ import annotations

from pathlib import Path

from deepsports.cli.docs import argument_table

REPO = Path(__file__).resolve().parents[2]


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:30])
    assert "make demo" in head and "make test" in head


def test_readme_argument_table_is_current():
    assert argument_table() in (REPO / "README.md").read_text(), \
        "README's argument table is stale: paste the output of `python -m deepsports.cli.docs`"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert "pytest" in makefile.split("\ntest:")[1].split("\n\n")[0]
