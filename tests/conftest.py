"""Test-wide settings: offline Hugging Face, one thread per process, deterministic torch; the one 2-process launch,
shared by every pytest-xdist worker of a session (``make test`` runs ``pytest -n 2``)."""

import os

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


@pytest.fixture(scope='session')
def two_processes(tmp_path_factory):
    """The folder tests/two_processes.py wrote: every 2-process check, run in one ``composer -n 2`` launch."""
    from pathlib import Path

    from conformance.harness import make_trainer
    from filelock import FileLock
    from support import launch

    # Under xdist each worker has its own basetemp below the session's folder: the first worker to get here launches,
    # the others wait on the lock and read what it wrote.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent
    out = shared / 'two-processes'
    with FileLock(str(shared / 'two-processes.lock')):
        if not (out / 'launched').exists():
            out.mkdir(exist_ok=True)
            plain = make_trainer([], max_duration='1ep', save_folder=str(out / 'plain'), save_interval='1ep')
            plain.fit()  # the unsharded single-process checkpoint the FSDP2 part loads
            plain.close()
            (out / 'launched').touch()  # a launch that fails fails every test that reads it, on every worker
            launch(Path(__file__).with_name('two_processes.py'), out, out / 'plain' / 'ep1-ba4-rank0.pt', timeout=1500)
    return out
