"""Every ``Examples:`` block in the public docstrings runs as a doctest."""

from __future__ import annotations

import doctest

import pytest

import info_nce
from info_nce import cache, functional, module, queue

PUBLIC = [getattr(info_nce, name) for name in info_nce.__all__ if name != "__version__"]
TESTS = [
    test
    for source in (cache, functional, module, queue)
    for test in doctest.DocTestFinder().find(source)
    if test.examples and any(test.name.endswith("." + obj.__name__) for obj in PUBLIC)
]


def test_every_public_name_has_an_example() -> None:
    documented = {test.name.rsplit(".", 1)[-1] for test in TESTS}
    assert documented == {obj.__name__ for obj in PUBLIC}


@pytest.mark.parametrize("test", TESTS, ids=[test.name for test in TESTS])
def test_docstring_examples_run(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=lambda text: None)
    if result.failed:
        report: list[str] = []
        doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test, out=report.append)
        pytest.fail("".join(report), pytrace=False)
