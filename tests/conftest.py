"""Test-wide settings: offline Hugging Face, one thread per process, deterministic torch; the one 2-process launch,
shared by every pytest-xdist worker of a session (``make test`` runs ``pytest -n 2``)."""

import atexit
import os
from pathlib import Path

import pytest
from filelock import FileLock
from support import start_launch, stop_launch, wait_launch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


LAUNCH = Path(__file__).with_name('two_processes.py')


def _launch_folder(config: pytest.Config) -> Path:
    """The session's folder for the 2-process launch: under xdist each worker has its own basetemp below it."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    worker = hasattr(config, 'workerinput')  # this process is an xdist worker (not a pytest it started)
    return (base.parent if worker else base) / 'two-processes'


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When tests read the 2-process launch: they run last, and the launch starts now, in the background, so it
    overlaps the rest of the suite. The first process (or xdist worker) to get here starts it, once per session."""
    reading = [item for item in items if 'two_processes' in getattr(item, 'fixturenames', ())]
    if not reading or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in reading] + reading
    folder = _launch_folder(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / 'two-processes.lock')):
        if folder.exists():
            return
        folder.mkdir()
        from conformance.harness import make_trainer

        plain = make_trainer([], max_duration='1ep', save_folder=str(folder / 'plain'), save_interval='1ep')
        plain.fit()  # the unsharded single-process checkpoint the FSDP2 part loads
        plain.close()
        launch = start_launch(LAUNCH, folder, folder / 'plain' / 'ep1-ba4-rank0.pt', folder=folder)
        atexit.register(stop_launch, launch)  # a session that ends early does not leave it running


@pytest.fixture(scope='session')
def two_processes(pytestconfig: pytest.Config) -> Path:
    """The folder tests/two_processes.py wrote: every 2-process check, run in one ``composer -n 2`` launch."""
    folder = _launch_folder(pytestconfig)
    wait_launch(folder)
    return folder
