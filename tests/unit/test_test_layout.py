"""The test tree itself: pytest imports every test module by its basename (rootdir-relative, no packages),
so two test files of one name in different folders stop the whole run at collection ("import file
mismatch") when they are collected together, as `./run.sh test` does and a run of one folder does not."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_name_of_its_own() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, k in names.items() if k > 1] == []
