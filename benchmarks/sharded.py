"""Per-process training-state bytes at the launch's world size: each algorithm replicated (DDP) and sharded
(Composer's FSDP2).

Run with ``make bench-sharded`` (``composer -n 2 -m benchmarks.sharded``), or at another world size with ``make
bench-sharded NPROC=4``. Every method trains the 20.9M-parameter decoder of ``make bench-quick`` for 2 epochs of one
batch of 4 per process; the recorder counts this process's parameters, gradients and
optimizer state after every batch (only the local shards under FSDP2), reported at the last batch (HiFT: at the
batch with the most state, the embeddings' turn). Next to it is
:func:`composer_thaw.recipes.memory_estimate.estimate_training_state` with ``world_size`` the launch's (FSDP2) or 1
(DDP).
Writes ``benchmarks/results/sharded.json`` and ``sharded.md`` (world size 2), ``sharded-ws<N>.json`` and
``sharded-ws<N>.md`` (world size N) from rank 0; ``python -m benchmarks.sharded --table <json>`` prints a saved
result's table again.
"""

from __future__ import annotations

import json
import sys
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
    world_size = dist.get_world_size() if layout == 'FSDP2' else 1
    estimate = estimate_training_state(spec, name, estimated_options, world_size=world_size)
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
        'total (MiB) | estimate (MiB) | vs estimate | total per rank (MiB) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        totals = [s['params'] + s['grads'] + s['optimizer_state'] for s in row['state_per_rank']]
        worst = row['state_per_rank'][totals.index(max(totals))]
        total = max(totals)
        estimate = sum(row['estimate'].values())
        lines.append(
            f'| {row["label"]} | {row["layout"]} | {row["measured_at"]} | {_mib(worst["params"])} | '
            f'{_mib(worst["grads"])} | '
            f'{_mib(worst["optimizer_state"])} | {_mib(total)} | {_mib(estimate)} | '
            f'{(total - estimate) / estimate:+.2%} | {" / ".join(_mib(t) for t in totals)} |'
        )
    return '\n'.join(lines)


def _names(world_size: int) -> tuple[str, str]:
    """The result files of a world size: ``sharded.json`` and ``sharded.md`` at 2 (the first ones), else with it."""
    stem = 'sharded' if world_size == 2 else f'sharded-ws{world_size}'
    return f'{stem}.json', f'{stem}.md'


def _title(task_title: str, world_size: int) -> str:
    return (
        f"Per-process training state at world size {world_size} (the largest rank, and each rank's total), "
        f'{task_title}; the estimate is `thaw estimate --world-size {world_size}` for FSDP2 and 1 for DDP:'
    )


def main(only: Optional[list[str]] = None) -> None:
    # one batch of 4 per process and epoch at any world size (the samples are split over the processes)
    task = build_tasks(quick=True, only=['decoder-m'], batches=2 * dist.get_world_size())[0]
    rows = [
        _measure(method, task, layout) for method in METHODS if method.key in (only or MEASURED) for layout in LAYOUTS
    ]
    world_size = dist.get_world_size()
    if dist.get_global_rank() == 0:
        RESULTS.mkdir(exist_ok=True)
        json_name, table_name = _names(world_size)
        result = {'task': task.title, 'world_size': world_size, 'rows': rows}
        atomic_write_text(RESULTS / json_name, json.dumps(result, indent=2))
        table = _table(rows, _title(task.title, world_size))
        atomic_write_text(RESULTS / table_name, table + '\n')
        print(table)


def table_of(path: Path) -> str:
    """The table of a saved result (``benchmarks/results/sharded*.json``)."""
    result = json.loads(path.read_text())
    world_size = result.get('world_size', len(result['rows'][0]['state_per_rank']))
    return _table(result['rows'], _title(result['task'], world_size))


if __name__ == '__main__':
    if sys.argv[1:2] == ['--table']:
        print(table_of(Path(sys.argv[2])))
    else:
        main()
