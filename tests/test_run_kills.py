"""A ``thaw run`` killed with SIGKILL at random points, during a checkpoint save or during a training step, leaves
only whole checkpoints and a ``latest`` link to the newest; the same command with ``autoresume`` ends bit-identical
to an uninterrupted run and repeats only the batch that was in progress. SIGTERM stops at the end of the batch with a
checkpoint and prints the command that resumes.

Each killed run is a child of ``tests/killed_run.py`` (one fresh interpreter forks them all), which SIGKILLs itself
at a point drawn from a seeded generator: after some of a checkpoint's bytes are written, or just before or after an
optimizer step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO, TINY_HIFT_RUN, set_args, two_process_part
from torch.optim.optimizer import register_optimizer_step_pre_hook

from composer_thaw.cli import main
from composer_thaw.recipes.run_files import check_checkpoint_path
from composer_thaw.recipes.running import run_recipe
from composer_thaw.recipes.schema import load_recipe

DEMO = REPO / 'yamls/demo.yaml'
BATCHES = 3
RECIPE = [*TINY_HIFT_RUN, 'data.max_train_samples=12', f'max_duration={BATCHES}ba', 'run_name=killed']


FAULTS = random.Random(17)
TRIALS = [
    ('save', FAULTS.randint(1, BATCHES), FAULTS.random()),
    ('save', FAULTS.randint(1, BATCHES), FAULTS.random()),
    ('step', FAULTS.randint(1, BATCHES), float(FAULTS.random() < 0.5)),
    ('step', FAULTS.randint(1, BATCHES), float(FAULTS.random() < 0.5)),
]
SAVING = ['save_interval=1ba', 'autoresume=true']


def _id(kind: str, batch: int, where: float) -> str:
    return f'{kind} {batch} {where:.2f}'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Every run here computes with one thread, as the killed children do, so float sums add up in the same order in
    killed, resumed and uninterrupted runs on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def uninterrupted() -> list[str]:
    return run_recipe(load_recipe(DEMO, RECIPE)).param_checksums


@pytest.fixture(scope='module')
def killed(tmp_path_factory) -> dict[str, tuple[Path, dict[str, int]]]:
    """Each trial's ``thaw run``, killed by its fault in a child of ``tests/killed_run.py``: its save folder and how
    it ended."""
    root = tmp_path_factory.mktemp('killed')
    trials = [
        {
            'id': _id(kind, batch, where),
            'kind': kind,
            'batch': batch,
            'where': where,
            'command': [
                'run',
                str(DEMO),
                *set_args([*RECIPE, f'save_folder={root / _id(kind, batch, where)}', *SAVING]),
            ],
        }
        for kind, batch, where in TRIALS
    ]
    (root / 'trials.json').write_text(json.dumps(trials))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    script = [sys.executable, str(REPO / 'tests/killed_run.py'), str(root / 'trials.json'), str(root / 'status.json')]
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ended = json.loads((root / 'status.json').read_text())
    return {trial['id']: (root / trial['id'], ended[trial['id']]) for trial in trials}


def _checkpoints(folder: Path) -> set[int]:
    """The batches of the checkpoints in ``folder``; each must be whole (a kill never leaves one that is not)."""
    batches = set()
    for path in folder.glob('ep*-ba*-rank0.pt'):
        check_checkpoint_path('load_path', str(path), sharded=False)  # raises on a partial file
        batches.add(int(re.search(r'ba(\d+)', path.name).group(1)))
    return batches


@pytest.mark.parametrize('kind, batch, where', TRIALS, ids=[_id(*trial) for trial in TRIALS])
def test_a_run_killed_anywhere_resumes_to_the_same_end(kind, batch, where, killed, uninterrupted):
    folder, ended = killed[_id(kind, batch, where)]
    assert ended == {'signal': signal.SIGKILL}, f'the fault never fired: {ended}'
    assert _checkpoints(folder) == set(range(1, batch))  # every batch before the killed one is saved, whole
    latest = folder / 'latest-rank0.pt'
    assert latest.is_symlink() == (batch > 1) and (batch == 1 or os.readlink(latest) == f'ep0-ba{batch - 1}-rank0.pt')

    resumed = run_recipe(load_recipe(DEMO, [*RECIPE, f'save_folder={folder}', *SAVING]))
    assert resumed.param_checksums == uninterrupted
    assert resumed.batches_run == BATCHES - (batch - 1)  # only the batch in progress is repeated


def test_sigterm_saves_at_the_end_of_the_batch_and_prints_the_command_that_resumes(uninterrupted, tmp_path, capsys):
    steps = iter(range(1, 1000))

    def terminate_at_the_second_step(optimizer, args, kwargs) -> None:
        if next(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = tmp_path / 'summary.json'
    overrides = [*RECIPE, f'save_folder={tmp_path / "runs"}', 'save_interval=100ba', f'summary_path={summary}']
    hook = register_optimizer_step_pre_hook(terminate_at_the_second_step)
    try:
        code = main(['run', str(DEMO), *set_args(overrides)])
    finally:
        hook.remove()
    assert code == 128 + signal.SIGTERM
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('thaw run: interrupted by SIGTERM after batch 2; saved '), lines
    assert _checkpoints(tmp_path / 'runs') == {2} and not summary.exists()
    command = shlex.split(lines[0].partition('continue from the latest one with: ')[2])
    assert command[:2] == ['thaw', 'run'] and '--set' in command and 'autoresume=true' in command
    assert main(command[1:]) == 0
    assert json.loads(summary.read_text())['param_checksums'] == uninterrupted


@pytest.mark.multiprocess
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_batch_with_one_checkpoint(two_processes):
    """tests/interruption_ddp_check.py: a DDP ``thaw run`` at 2 processes, SIGTERM to rank 0 alone."""
    result = json.loads((two_process_part(two_processes, 'interruption') / 'result.json').read_text())
    straight, interrupted, resumed = zip(*result['exit'])
    assert straight == (0, 0) and interrupted == (128 + signal.SIGTERM,) * 2 and resumed == (0, 0)
    assert result['saved'] == ['ep0-ba2-rank0.pt'] and not result['interrupted_summary_written']
    assert result['resumed_batches_run'] == 2 and result['resumed_equals_uninterrupted']
    message, quiet = result['messages']  # rank 0 says it, once
    assert 'thaw run: interrupted by SIGTERM after batch 2; saved ' in message and 'thaw run:' not in quiet
    command = shlex.split(message.partition('continue from the latest one with: ')[2].splitlines()[0])
    assert command[-2:] == ['--nproc', '2'] and 'autoresume=true' in command
