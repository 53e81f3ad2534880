"""Test-wide settings: offline Hugging Face, one thread per process, deterministic torch; the session's multi-process
launches (tests/launches.py: 2 processes, two nodes of 2, then elastic resumes at 2 and 1), started once and shared by
every pytest-xdist worker of a session (``make test`` runs ``pytest -n 2``)."""

import atexit
import os
from pathlib import Path

import pytest
from filelock import FileLock
from support import release_trainers, start_launch, stop_launch, wait_launch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


# Each fixture that reads the launches, and the last launch it needs (tests/launches.py runs them in this order).
LAUNCH_FIXTURES = {'two_processes': 'two-processes', 'four_processes': 'four-processes', 'elastic_resumes': 'elastic-1'}


def _launches_folder(config: pytest.Config) -> Path:
    """The session's folder for the launches: under xdist each worker has its own basetemp below it. With
    ``THAW_TEST_LAUNCHES`` set to the ``launches`` folder of an earlier session, its tests read that one (nothing
    is launched: for working on the tests that read the launches)."""
    if os.environ.get('THAW_TEST_LAUNCHES'):
        return Path(os.environ['THAW_TEST_LAUNCHES'])
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    worker = hasattr(config, 'workerinput')  # this process is an xdist worker (not a pytest it started)
    return (base.parent if worker else base) / 'launches'


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When tests read the multi-process launches: they run last (in the launches' order), and the launches they
    need start now, in the background, so they overlap the rest of the suite (a selection that reads only the
    2-process launch starts only that one). The first process (or xdist worker) to get here starts them, once per
    session."""
    reading = {
        fixture: [item for item in items if fixture in getattr(item, 'fixturenames', ())] for fixture in LAUNCH_FIXTURES
    }
    if not any(reading.values()) or config.option.collectonly:
        return
    ordered = [item for fixture in LAUNCH_FIXTURES for item in reading[fixture]]
    items[:] = [item for item in items if item not in ordered] + list(dict.fromkeys(ordered))
    root = _launches_folder(config)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / 'launches.lock')):
        if root.exists():
            return
        root.mkdir()
        from conformance.harness import make_trainer

        plain = make_trainer([], max_duration='1ep', save_folder=str(root / 'plain'), save_interval='1ep')
        plain.fit()  # the unsharded single-process checkpoint the FSDP2 part loads
        plain.close()
        last = [LAUNCH_FIXTURES[fixture] for fixture, read in reading.items() if read][-1]
        launch = start_launch(root, root / 'plain' / 'ep1-ba4-rank0.pt', until=last)
        atexit.register(stop_launch, launch)  # a session that ends early does not leave them running


@pytest.fixture(scope='session')
def two_processes(pytestconfig: pytest.Config) -> Path:
    """The folder tests/two_processes.py wrote: every 2-process check, run in one ``composer -n 2`` launch."""
    folder = _launches_folder(pytestconfig) / 'two-processes'
    wait_launch(folder)
    return folder


@pytest.fixture(scope='session')
def four_processes(pytestconfig: pytest.Config) -> Path:
    """The folder tests/four_processes.py wrote: HSDP and resumes at 4, run as two nodes of 2 processes."""
    folder = _launches_folder(pytestconfig) / 'four-processes'
    wait_launch(folder)
    return folder


@pytest.fixture(scope='session')
def elastic_resumes(pytestconfig: pytest.Config) -> dict[int, Path]:
    """The folders tests/elastic_resumes.py wrote, by world size: the checkpoints written at 4 resumed at 2, and
    those written at 2 resumed at 1."""
    root = _launches_folder(pytestconfig)
    for name in ('elastic-2', 'elastic-1'):
        wait_launch(root / name)
    return {2: root / 'elastic-2', 1: root / 'elastic-1'}


@pytest.fixture(autouse=True)
def _let_trainers_go():
    """After each test, let its Trainers be freed (:func:`support.release_trainers`): an xdist worker grew by every
    Trainer it had run (about 7 GB by the end of the suite)."""
    yield
    release_trainers()
