"""CONTRIBUTING.md's worked example: ``FreezeEmbeddings``, a third-party algorithm packaged on its own in
``tests/example_algorithm/``, registered through the ``composer_thaw.algorithms`` entry point its
``pyproject.toml`` declares, passes the generated single-process conformance suite."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

EXAMPLE = REPO / 'tests' / 'example_algorithm'
PROJECT = tomllib.loads((EXAMPLE / 'pyproject.toml').read_text())['project']
(NAME,) = PROJECT['entry-points']['composer_thaw.algorithms']
# The suite generates 24 single-process checks for it on a machine without CUDA (26 with the 2 GPU ones); fewer
# passing means the suite no longer covers the example.
MIN_PASSED = 24


def _install(root: Path) -> None:
    """What ``pip install --no-deps --target root tests/example_algorithm`` leaves there, without building a wheel
    (which would need the network for build isolation): the package and a ``*.dist-info`` folder whose
    ``entry_points.txt`` is the ``[project.entry-points]`` table of its ``pyproject.toml``."""
    shutil.copytree(EXAMPLE / 'thaw_example', root / 'thaw_example', ignore=shutil.ignore_patterns('__pycache__'))
    info = root / f'{PROJECT["name"].replace("-", "_")}-{PROJECT["version"]}.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {PROJECT["name"]}\nVersion: {PROJECT["version"]}\n')
    lines = []
    for group, entries in PROJECT['entry-points'].items():
        lines += [f'[{group}]', *(f'{name} = {target}' for name, target in entries.items()), '']
    (info / 'entry_points.txt').write_text('\n'.join(lines))


def _summary_counts(output: str) -> dict[str, int]:
    """``{'passed': 24, 'skipped': 2, ...}`` from pytest's closing line."""
    closing = [line for line in output.splitlines() if re.search(r'\d+ (passed|failed|error|deselected)', line)]
    assert closing, output[-3000:]
    return {word: int(count) for count, word in re.findall(r'(\d+) (\w+)', closing[-1])}


def test_the_example_algorithm_passes_the_generated_conformance_suite(tmp_path):
    _install(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')])))
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'pytest',
            '-q',
            '-p',
            'no:cacheprovider',
            'tests/conformance',
            '-m',
            'not multiprocess',
            '-k',
            NAME,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    counts = _summary_counts(result.stdout)
    assert result.returncode == 0, output[-6000:]
    assert not counts.get('failed') and not counts.get('error') and not counts.get('errors'), output[-6000:]
    assert counts.get('passed', 0) >= MIN_PASSED, f'only {counts} for {NAME}: the suite does not cover it'


@pytest.fixture
def thaw_example(monkeypatch):
    """The example package importable in this process (not registered: the registry here stays as it is)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import thaw_example

    yield thaw_example
    for module in [m for m in sys.modules if m == 'thaw_example' or m.startswith('thaw_example.')]:
        del sys.modules[module]


def test_tied_embeddings_are_one_parameter_and_leave_the_optimizer(thaw_example):
    from support import seeded_tiny_decoder

    model = seeded_tiny_decoder(tie_word_embeddings=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    count = sum(len(group['params']) for group in optimizer.param_groups)
    frozen = thaw_example.apply_freeze_embeddings(model, optimizer, which='both')
    assert frozen == ['model.embed_tokens.weight']
    assert not model.model.model.embed_tokens.weight.requires_grad
    assert sum(len(group['params']) for group in optimizer.param_groups) == count - 1
    assert thaw_example.apply_freeze_embeddings(model, optimizer, which='both') == frozen  # again: a no-op


def test_a_model_without_embeddings_is_refused_before_anything_changes(thaw_example):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match='no embedding parameters'):
        thaw_example.apply_freeze_embeddings(model, None)
    assert all(p.requires_grad for p in model.parameters())
    plain = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    assert thaw_example.embedding_parameters(plain) == {'0.weight': plain[0].weight}


def test_the_repr_of_a_registered_third_party_algorithm_evals_back(thaw_example, monkeypatch):
    """``eval_repr`` (used to rebuild algorithms from checkpoints) knows classes registered under the entry point."""
    from importlib.metadata import EntryPoint

    from composer_thaw.core import registry
    from composer_thaw.core.state import eval_repr

    point = EntryPoint(
        name=NAME, value=PROJECT['entry-points'][registry.ENTRY_POINT_GROUP][NAME], group=registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(registry, 'entry_points', lambda group: [point] if group == registry.ENTRY_POINT_GROUP else [])
    registry.algorithm_registry.cache_clear()
    try:
        algorithm = thaw_example.FreezeEmbeddings(which='both')
        assert eval_repr(repr(algorithm)) == algorithm
    finally:
        registry.algorithm_registry.cache_clear()
