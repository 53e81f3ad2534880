"""Runs of ``thaw run`` that SIGKILL themselves at chosen points, for ``tests/test_run_kills.py``.

    python tests/killed_run.py trials.json status.json

``trials.json`` is a list of ``{"id", "kind": "save" | "step", "batch", "where", "command"}``: ``save`` stops the
``batch``-th checkpoint write after ``where`` (a fraction) of its bytes; ``step`` kills the ``batch``-th optimizer
step just before it changes the parameters (``where`` 0) or just after (1). ``status.json`` gets each trial's
``{"signal": n}`` or ``{"exit": n}``.

This interpreter imports the libraries once and forks a child per trial before computing anything itself. Not a
fork of pytest: a fork copies whatever locks the test process's other threads held (OpenMP's pool, tokenizers',
loggers'), and the child can wait on them forever.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from composer.utils import checkpoint as composer_checkpoint
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from composer_thaw.cli import main


def kill_during_save(save: int, fraction: float) -> None:
    """The ``save``-th checkpoint write stops after ``fraction`` of its bytes."""
    write, saves = composer_checkpoint._write_checkpoint_file, iter(range(1, 1000))

    def killed_while_writing(state_dict, filename: str) -> None:
        if next(saves) != save:
            return write(state_dict, filename)
        data = io.BytesIO()
        torch.save(state_dict, data)
        with open(filename, 'wb') as file:
            file.write(data.getbuffer()[: int(fraction * data.tell())])
            file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    composer_checkpoint._write_checkpoint_file = killed_while_writing


def kill_during_step(step: int, after: bool) -> None:
    """The ``step``-th optimizer step is killed just before it changes the parameters, or just after."""
    steps = iter(range(1, 1000))

    def kill(optimizer, args, kwargs) -> None:
        if next(steps) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    (register_optimizer_step_post_hook if after else register_optimizer_step_pre_hook)(kill)


def run_killed(kind: str, batch: int, where: float, command: list[str]) -> dict[str, int]:
    """Fork a child that installs the fault and runs ``thaw <command>``; how it ended."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            torch.set_num_threads(1)  # as the test's own runs: float sums add up in the same order
            if kind == 'save':
                kill_during_save(batch, where)
            else:
                kill_during_step(batch, bool(where))
            main(command)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return {'signal': os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {'exit': os.WEXITSTATUS(status)}


if __name__ == '__main__':
    trials, status = (Path(arg) for arg in sys.argv[1:])
    ended = {
        t['id']: run_killed(t['kind'], t['batch'], t['where'], t['command']) for t in json.loads(trials.read_text())
    }
    status.write_text(json.dumps(ended))
