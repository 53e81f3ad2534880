"""Every multi-process launch of a test session, one after another, started once in the background by
tests/conftest.py (``python tests/launches.py ROOT PLAIN_CHECKPOINT UNTIL``: the launches up to the one named
``UNTIL``, the last one the session's tests read). Each writes into ``ROOT/<launch>``: its launchers' output
(``launch.log``, ``launch-node1.log``) and, when every launcher has ended, ``returncode``.

1. ``two-processes``: ``composer -n 2 tests/two_processes.py`` (every 2-process check; FSDP2 checkpoints at 2).
2. ``four-processes``: two launchers of 2 processes on localhost as two nodes of a world of 4
   (``--world_size 4 --nproc 2 --node_rank {0,1} --master_addr 127.0.0.1 --master_port P``):
   tests/four_processes.py (HSDP; the checkpoints of 1. resumed at 4; checkpoints written at 4).
3. ``elastic-2``: ``composer -n 2 tests/elastic_resumes.py``: the checkpoints written at 4 (plain FSDP2 runs,
   and the HSDP master-weights runs) resumed at 2.
4. ``elastic-1``: ``composer -n 1 tests/elastic_resumes.py``: the checkpoints of 1. resumed at 1.

A later launch runs even when an earlier one failed (its tests then fail on their part's error).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LAUNCHER = [sys.executable, '-m', 'composer.cli.launcher']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launches(root: Path, plain_checkpoint: str) -> dict[str, list[list[str]]]:
    """Each launch's name and its launcher commands (one per node)."""
    two, four = root / 'two-processes', root / 'four-processes'
    sharded = two / 'fsdp2' / 'sharded-checkpoints'
    port = str(_free_port())
    nodes = [
        [*LAUNCHER, '--world_size', '4', '--nproc', '2', '--node_rank', str(rank)]
        + ['--master_addr', '127.0.0.1', '--master_port', port, str(TESTS / 'four_processes.py'), str(four), str(two)]
        for rank in (0, 1)
    ]
    elastic = str(TESTS / 'elastic_resumes.py')
    return {
        'two-processes': [[*LAUNCHER, '-n', '2', str(TESTS / 'two_processes.py'), str(two), plain_checkpoint]],
        'four-processes': nodes,
        'elastic-2': [
            [*LAUNCHER, '-n', '2', elastic, str(root / 'elastic-2')]
            + [str(four / 'elastic' / 'checkpoints'), str(four / 'hsdp' / 'master-weights')]
        ],
        'elastic-1': [
            [*LAUNCHER, '-n', '1', elastic, str(root / 'elastic-1'), str(sharded / 'sharded')]
            + [str(sharded / 'master-weights')]
        ],
    }


def run(folder: Path, commands: list[list[str]]) -> None:
    """Run one launch's launchers at once into ``folder``; write the first nonzero exit status (or 0) when all end."""
    folder.mkdir(parents=True, exist_ok=True)
    processes = []
    for node, command in enumerate(commands):
        log = (folder / ('launch.log' if node == 0 else f'launch-node{node}.log')).open('w')
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    codes = [process.wait() for process in processes]
    (folder / 'returncode.tmp').write_text(str(next((code for code in codes if code), 0)))
    (folder / 'returncode.tmp').rename(folder / 'returncode')


def main(root: Path, plain_checkpoint: str, until: str) -> None:
    every = launches(root, plain_checkpoint)
    if until not in every:
        raise SystemExit(f'launches.py: no launch named {until!r}; the launches: {", ".join(every)}')
    for name, commands in every.items():
        run(root / name, commands)
        if name == until:
            return


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
