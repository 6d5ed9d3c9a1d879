"""docs/adding-*.md: the checklists for a new backbone, solver, objective and target name files and
tests that exist (the coverage tests they name fail when a registered built-in lacks its entry)."""

import re

import pytest

from test_cli import ROOT

CHECKLISTS = sorted((ROOT / "docs").glob("adding-*.md"))


def test_there_is_a_checklist_per_kind_a_contributor_adds():
    assert [p.name for p in CHECKLISTS] == ["adding-a-backbone.md", "adding-a-solver.md", "adding-a-target.md",
                                            "adding-an-objective.md"]


@pytest.mark.parametrize("path", CHECKLISTS, ids=lambda p: p.name)
def test_a_checklist_names_files_and_tests_that_exist(path):
    text = path.read_text()
    files = [f for f in re.findall(r"`([\w./-]+\.(?:py|toml|md))`", text) if "/" in f or f == "pyproject.toml"]
    assert files and [f for f in files if not (ROOT / f).exists()] == []
    tests = re.findall(r"`(test_\w+)`", text)
    assert tests
    source = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert [t for t in tests if f"def {t}(" not in source] == []
