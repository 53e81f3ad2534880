"""Run under ``composer -n 2`` (a part of tests/two_processes.py): SIGTERM to one rank of a DDP ``thaw run``.

Rank 0 alone gets SIGTERM during its second optimizer step. Both ranks must stop at the end of batch 2 with exit
status 143 (128 + SIGTERM), having written one checkpoint together; the command printed resumes with ``--nproc 2``;
``autoresume`` then ends bit-identical to an uninterrupted run. Rank 0 writes the findings as JSON to
``<folder>/result.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

from composer.utils import dist
from rank_checks import write_from_rank_zero
from support import TINY_HIFT_RUN, set_args
from torch.optim.optimizer import register_optimizer_step_pre_hook

from composer_thaw.cli import main as thaw

RECIPE = [*TINY_HIFT_RUN, 'data.max_train_samples=16', 'max_duration=4ba', 'run_name=interrupted']


def _run(*overrides: str) -> int:
    return thaw(['run', 'yamls/demo.yaml', *set_args([*RECIPE, *overrides])])


def main(folder: Path) -> None:
    runs = folder / 'runs'
    straight = _run(f'summary_path={folder / "straight.json"}')

    steps = iter(range(1, 1000))

    def terminate_rank_zero_at_the_second_step(optimizer, args, kwargs) -> None:
        if next(steps) == 2 and dist.get_global_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    hook = register_optimizer_step_pre_hook(terminate_rank_zero_at_the_second_step)
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            interrupted = _run(
                f'save_folder={runs}', 'save_interval=100ba', f'summary_path={folder / "interrupted.json"}'
            )
    finally:
        hook.remove()
    saved = sorted(path.name for path in runs.glob('ep*')) if runs.exists() else []
    dist.barrier()
    resumed = _run(f'save_folder={runs}', 'save_interval=100ba', 'autoresume=true',
                   f'summary_path={folder / "resumed.json"}')  # fmt: skip
    result: dict = {
        'exit': dist.all_gather_object([straight, interrupted, resumed]),
        'saved': saved,
        'messages': dist.all_gather_object(message.getvalue()),
    }
    if dist.get_global_rank() == 0:
        summaries = {name: json.loads((folder / f'{name}.json').read_text()) for name in ('straight', 'resumed')}
        result['interrupted_summary_written'] = (folder / 'interrupted.json').exists()
        result['resumed_batches_run'] = summaries['resumed']['batches_run']
        result['resumed_equals_uninterrupted'] = (
            summaries['resumed']['param_checksums'] == summaries['straight']['param_checksums']
        )
    write_from_rank_zero(str(folder / 'result.json'), result)
