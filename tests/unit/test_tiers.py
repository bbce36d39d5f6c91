"""The fast tier keeps itself fast: tests/conftest.py fails any test without the slow marker that runs
past the limit, so a slow test cannot slip into `pytest -m "not slow"` unnoticed."""

from __future__ import annotations

from tests.conftest import ROOT

pytest_plugins = ["pytester"]

PROBES = '''
import time

import pytest


def test_unmarked_and_slow():
    time.sleep(1.2)


@pytest.mark.slow
def test_marked_and_slow():
    time.sleep(1.2)


def test_unmarked_and_quick():
    pass


@pytest.fixture
def slow_setup():
    time.sleep(1.2)


def test_unmarked_with_a_slow_fixture(slow_setup):
    pass
'''


def test_an_unmarked_test_over_the_limit_fails_and_names_the_marker(pytester, monkeypatch):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: long runs\n")
    pytester.makepyfile(test_probes=PROBES)
    monkeypatch.setenv("HFTK_UNMARKED_LIMIT_S", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*test_unmarked_and_slow took 1.* without @pytest.mark.slow*",
                                 "*test_unmarked_with_a_slow_fixture took 1.* without @pytest.mark.slow*"])
    assert "test_marked_and_slow took" not in result.stdout.str()
