"""A fresh clone is self-contained: no library or test code refers to a path outside the repository.

A user's clone has nothing beside it, so a file that climbs above the repository root (``../x``,
``REPO.parent``, ``Path(__file__).parents[k]`` past the root) or reads a folder named by an
environment variable of this machine works here and fails there. The scan is syntactic (``ast``):
every ``Path(__file__)`` chain is followed, names bound to such chains at module level included.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# This file is left out: its probes spell the very patterns it looks for.
SCANNED = sorted(p for folder in ("deepsports", "tests") for p in (REPO / folder).rglob("*.py")
                 if p != Path(__file__).resolve())
# A line that spells ".." on purpose, not as a path (bad input in a test, a check for it) says so.
ALLOW = "path-scan: not a path"
# A parent-folder step in a path: "../x", "a/..", ".." (not "..." nor "a..b" in messages).
PARENT_STEP = re.compile(r"(?:^|[/\\])\.\.(?:[/\\]|$)")
# Spelled in pieces so that this file does not match its own patterns.
FORBIDDEN_WORDS = ("DEEPSPORTS_" + "SHARED_DIR", "/work" + "/shared")


def _levels_up(node: ast.AST, bound: dict[str, int]) -> int | None:
    """How many folders above the file's own folder ``node`` points (0 = the file's folder), or None."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id == "Path" and node.args:
            arg = node.args[0]
            return -1 if isinstance(arg, ast.Name) and arg.id == "__file__" else None
        if isinstance(func, ast.Attribute) and func.attr in ("resolve", "absolute", "expanduser"):
            return _levels_up(func.value, bound)
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _levels_up(node.value, bound)
        return None if inner is None else inner + 1
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
        inner = _levels_up(node.value.value, bound)
        index = node.slice
        if inner is None or not (isinstance(index, ast.Constant) and isinstance(index.value, int)):
            return None
        return inner + index.value + 1
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    return None


def escapes(relative: Path, text: str) -> list[str]:
    """Lines of ``text`` (the file at ``relative`` in the repository) that point outside the repository."""
    tree = ast.parse(text, filename=str(relative))
    lines = text.splitlines()
    depth = len(relative.parts) - 1  # folders between the repository root and the file
    bound: dict[str, int] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            level = _levels_up(stmt.value, bound)
            if level is not None:
                bound[stmt.targets[0].id] = level
    found = []
    # An f-string is checked as a whole ("{a}..{b}" is a range in a message, not a path step).
    pieces = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        level = _levels_up(node, bound) if isinstance(node, (ast.Attribute, ast.Subscript)) else None
        if level is not None and level > depth:
            found.append(f"{relative}:{node.lineno}: climbs {level - depth} folder(s) above the repository")
        text = None
        if isinstance(node, ast.JoinedStr):
            text = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in pieces:
            text = node.value
        if text is not None and ALLOW not in lines[node.lineno - 1]:
            if PARENT_STEP.search(text) or any(word in text for word in FORBIDDEN_WORDS):
                found.append(f"{relative}:{node.lineno}: {text[:60]!r}")
    return found


def test_no_library_or_test_file_refers_to_a_path_outside_the_repository():
    assert len(SCANNED) > 50  # the scan sees the whole package and suite
    problems = [line for path in SCANNED for line in escapes(path.relative_to(REPO), path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", [
    "REPO = Path(__file__).resolve().parents[2]\nX = REPO.parent / 'shared'\n",
    "X = Path(__file__).resolve().parent.parent.parent.parent\n",
    "X = Path(__file__).parents[3] / 'data'\n",
    "X = open('.." "/shared/mtl_aqa/x.pkl')\n",  # split so that no grep for the literal finds this file
    "import os\nX = os.environ['DEEPSPORTS_' 'SHARED_DIR']\n",
])
def test_the_scan_catches_each_way_out(source):
    assert ALLOW not in source
    # As if the file were two folders deep (tests/<dir>/x.py), as the suite's own files are.
    assert escapes(Path("tests", "reliability", "probe.py"), source)
    assert not escapes(Path("tests", "reliability", "probe.py"), "REPO = Path(__file__).resolve().parents[2]\n"
                                                                  "X = REPO / 'experiments'\n")


def test_the_shipped_files_are_package_data():
    """The MTL-AQA pickles and the named experiments, search spaces, SLURM profiles and templates are
    inside the package and listed as package data, so an install carries them."""
    import tomllib

    from deepsports.data.annotations import load_annotations, load_split, shipped_annotation_files

    files = shipped_annotation_files()
    assert REPO / "deepsports" in files.annotations.parents
    annotations = load_annotations(files.annotations)
    assert len(load_split(files.train, annotations)) > len(load_split(files.test, annotations)) > 0
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["deepsports"]
    # Everything a non-editable install needs beside the code: the pickles and the named files of
    # deepsports/assets (links to experiments/, search_spaces/, slurm/profiles/ and slurm/templates/).
    assets = [Path(top, name) for top, _, names in os.walk(REPO / "deepsports" / "assets", followlinks=True)
              for name in names]
    data = [files.annotations, files.train, files.test, *assets]
    assert len(data) > 10
    unshipped = [str(p) for p in data if not any(p.relative_to(REPO / "deepsports").match(pat) for pat in patterns)]
    assert not unshipped
