"""Per-process training-state bytes at world size 2: each algorithm replicated (DDP) and sharded (Composer's FSDP2).

Run with ``make bench-sharded`` (``composer -n 2 -m benchmarks.sharded``). Every method trains the 20.9M-parameter
decoder of ``make bench-quick`` for 2 epochs of 2 batches (the global batch split over the 2 processes); the
recorder counts this process's parameters, gradients and optimizer state after every batch (only the local
shards under FSDP2), reported at the last batch (HiFT: at the batch with the most state, the embeddings' turn).
Next to it is :func:`composer_thaw.recipes.memory_estimate.estimate_training_state` with ``world_size=2`` (FSDP2) or 1
(DDP).
Writes ``benchmarks/results/sharded.json`` and ``sharded.md`` from rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from composer import Trainer
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config

from benchmarks.measure import StepRecorder, default_state_counter
from benchmarks.methods import METHODS, build_tasks
from composer_thaw.recipes.memory_estimate import estimate_training_state, spec_of
from composer_thaw.utils.atomic_files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / 'results'
MEASURED = ('full', 'layer_freezing', 'regex_freeze', 'lora_inject', 'hift_rotation')
LAYOUTS = {'DDP': None, 'FSDP2': lambda: {'fsdp': FSDP2Config()}}


def _measure(method, task, layout: str) -> dict[str, Any]:
    setup = method.setup(task, 'cpu')
    spec = spec_of(setup.model.model)
    recorder = StepRecorder(setup.count_state or default_state_counter)
    parallelism = LAYOUTS[layout]
    trainer = Trainer(
        model=setup.model,
        train_dataloader=task.train_loader,
        max_duration='2ep',
        optimizers=setup.optimizer,
        algorithms=setup.algorithms,
        callbacks=[recorder, *setup.callbacks],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=17,
        python_log_level=None,
        parallelism_config=parallelism() if parallelism else None,
    )
    trainer.fit()
    trainer.close()
    # HiFT: the batch with the most state (the embeddings' turn), which the estimator predicts; the others: the last.
    measured = recorder.record.peak if method.key == 'hift_rotation' else recorder.record.last
    assert measured is not None
    name, options = method.estimate
    # The last batch is before the last epoch's freezing: LayerFreezing has frozen half the units by then.
    estimated_options = {'freeze_start': 0.0, 'freeze_level': 0.5} if name == 'layer_freezing' else options(task)
    estimate = estimate_training_state(spec, name, estimated_options, world_size=2 if layout == 'FSDP2' else 1)
    return {
        'method': method.key,
        'label': method.label,
        'layout': layout,
        'measured_at': 'peak batch' if method.key == 'hift_rotation' else 'last batch',
        'state_per_rank': dist.all_gather_object(vars(measured)),
        'estimate': {
            'params': estimate.param_bytes,
            'grads': estimate.grad_bytes,
            'optimizer_state': estimate.optimizer_state_bytes,
        },
    }


def _mib(n: float) -> str:
    return f'{n / 2**20:.2f}'


def _table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        title,
        '',
        '| method | layout | batch | params (MiB) | grads (MiB) | optimizer state (MiB) | '
        'total (MiB) | estimate (MiB) | vs estimate |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        worst = max(row['state_per_rank'], key=lambda s: s['params'] + s['grads'] + s['optimizer_state'])
        total = worst['params'] + worst['grads'] + worst['optimizer_state']
        estimate = sum(row['estimate'].values())
        lines.append(
            f'| {row["label"]} | {row["layout"]} | {row["measured_at"]} | {_mib(worst["params"])} | '
            f'{_mib(worst["grads"])} | '
            f'{_mib(worst["optimizer_state"])} | {_mib(total)} | {_mib(estimate)} | '
            f'{(total - estimate) / estimate:+.2%} |'
        )
    return '\n'.join(lines)


def main(only: Optional[list[str]] = None) -> None:
    task = build_tasks(quick=True, only=['decoder-m'], batches=4)[0]
    rows = [
        _measure(method, task, layout) for method in METHODS if method.key in (only or MEASURED) for layout in LAYOUTS
    ]
    if dist.get_global_rank() == 0:
        RESULTS.mkdir(exist_ok=True)
        atomic_write_text(RESULTS / 'sharded.json', json.dumps({'task': task.title, 'rows': rows}, indent=2))
        title = (
            f'Per-process training state at world size 2 (the larger rank), {task.title}; the estimate is '
            '`thaw estimate --world-size 2` for FSDP2 and 1 for DDP:'
        )
        table = _table(rows, title)
        atomic_write_text(RESULTS / 'sharded.md', table + '\n')
        print(table)


if __name__ == '__main__':
    main()
