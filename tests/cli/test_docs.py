"""The README and docs/ say what the code does: the first commands, the generated argument table, links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

from deepsports.cli.docs import argument_table

REPO = Path(__file__).resolve().parents[2]


def test_readme_starts_with_the_two_commands():
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:30])
    assert "make demo" in head and "make test" in head


def test_readme_argument_table_is_current():
    assert argument_table() in (REPO / "docs" / "configuration.md").read_text(), \
        "docs/configuration.md's argument table is stale: paste the output of `python -m deepsports.cli.docs`"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (REPO / "Makefile").read_text()
    assert "pytest" in makefile.split("\ntest:")[1].split("\n\n")[0]


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered."""
    found: set[str] = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            number = 0
            while (f"{slug}-{number}" if number else slug) in found:
                number += 1
            found.add(f"{slug}-{number}" if number else slug)
    return found


def _broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Relative links of ``path`` to a file missing under ``root`` or a heading missing in it (links in code
    are examples, not links; URLs with a scheme are not checked)."""
    text = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", path.read_text()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if root.resolve() not in dest.parents or not dest.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_of_the_readme_and_docs_resolves():
    files = _markdown_files()
    assert len(files) > 10  # the README and the manual in docs/
    assert [link for path in files for link in _broken_links(path)] == []


def test_the_link_checker_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# A title\n\n## Twice\n\n## Twice\n\n```\n# not a heading\n```\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#a-title) [ok](b.md#twice-1) [ok](#here) [web](https://example.org/x.md)\n"
                    "# Here\n`[code](x.md)`\n```\n[fenced](y.md)\n```\n"
                    "[gone](c.md) [no heading](b.md#not-a-heading) [outside](../elsewhere.md)\n")
    (tmp_path.parent / "elsewhere.md").write_text("# outside the root\n")
    assert _broken_links(page, tmp_path) == ["a.md: c.md (no such file)", "a.md: b.md#not-a-heading (no such heading)",
                                             "a.md: ../elsewhere.md (no such file)"]
