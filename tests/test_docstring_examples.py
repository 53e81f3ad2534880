"""The docstring examples run (issue #23): every ``>>>`` line in the package is a doctest, so none can go stale.

One test per module with examples: its docstrings' examples run with the module's globals (as ``python -m doctest``
would), on CPU, each module in a fresh empty working folder (an example may write ``runs/...``) holding a link to the
repository's ``yamls/`` (an example may load ``yamls/demo.yaml``), with torch seeded. Outputs match with ``...``
(ELLIPSIS) and any run of whitespace matching any other (NORMALIZE_WHITESPACE: a long message may wrap). An
exception is written under its own name (``ConfigTypeError: ...``): the package path Python prints before it
(``composer_thaw.core.validation.``) is left out of the comparison.

An example that cannot run in a unit test (several processes, a GPU, a full training run) carries
``# doctest: +SKIP`` and says why in its docstring; the API reference leaves the directive out
(``docs/griffe_examples.py``). Each module's test also checks that every ``>>>`` line of its file was collected, so
an example cannot hide where doctest does not look (a nested function's docstring, a comment), and that no
docstring's examples are all skipped.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'algorithms'
ROOT = 'composer_thaw'
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PROMPT = re.compile(r'^\s*>>>', re.MULTILINE)
# `composer_thaw.core.validation.ConfigTypeError: ...` (what Python prints) -> `ConfigTypeError: ...`
PACKAGE_PATH = re.compile(rf'^{ROOT}(?:\.\w+)*\.(?=\w+:)', re.MULTILINE)


def modules_with_examples() -> dict[str, Path]:
    """``composer_thaw.<dotted name>`` -> file, for each module whose source has a ``>>>`` line."""
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        if path.name == '__main__.py' or not PROMPT.search(path.read_text()):
            continue
        parts = list(path.relative_to(PACKAGE).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        found['.'.join([ROOT, *parts])] = path
    return found


MODULES = modules_with_examples()


class _Checker(doctest.OutputChecker):
    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(PACKAGE_PATH.sub('', want), PACKAGE_PATH.sub('', got), optionflags)


def test_the_package_has_examples() -> None:
    assert len(MODULES) > 40


@pytest.mark.parametrize('name', list(MODULES))
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / 'yamls').symlink_to(REPO / 'yamls')
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    collected = sum(len(test.examples) for test in tests)
    written = len(PROMPT.findall(MODULES[name].read_text()))
    assert collected == written, f'{name}: {written} >>> lines, but doctest collects {collected}'
    skipped = [test.name for test in tests if test.examples and all(e.options.get(doctest.SKIP) for e in test.examples)]
    assert not skipped, f'examples that never run (every line has "doctest: +SKIP"): {skipped}'

    report: list[str] = []
    runner = doctest.DocTestRunner(checker=_Checker(), optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=report.append)
    if runner.failures:
        pytest.fail(f'{runner.failures} failing example(s) in {name}:\n' + ''.join(report), pytrace=False)
