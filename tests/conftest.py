"""Test-wide settings: offline Hugging Face, one thread per process, deterministic torch; under pytest-xdist
(``make test`` runs ``pytest -n 2 --dist loadgroup``) every test of the one 2-process launch runs on one worker."""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the 2-process launch share one xdist group: the session fixture launches once, on one worker."""
    for item in items:
        if 'two_processes' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.xdist_group('two_processes'))


@pytest.fixture(scope='session')
def two_processes(tmp_path_factory):
    """The folder tests/two_processes.py wrote: every 2-process check, run in one ``composer -n 2`` launch."""
    from pathlib import Path

    from conformance.harness import make_trainer
    from support import launch

    out = tmp_path_factory.mktemp('two-processes')
    plain = make_trainer([], max_duration='1ep', save_folder=str(out / 'plain'), save_interval='1ep')
    plain.fit()  # the unsharded single-process checkpoint the FSDP2 part loads
    plain.close()
    launch(Path(__file__).with_name('two_processes.py'), out, out / 'plain' / 'ep1-ba4-rank0.pt', timeout=1500)
    return out
