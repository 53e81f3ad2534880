"""Run every method on every task in one process, interleaved and repeated, and write the tables, JSON and plots.

    python -m benchmarks.run --quick      # under 5 minutes on 2 CPU cores (make bench-quick)
    python -m benchmarks.run              # longer budgets: eval metrics worth reading (make bench)

For each task (MiniLM classification, the decoder LM at two sizes) and each method (full fine-tuning, ours, and the
peers in :mod:`benchmarks.methods`), a *run* is: a fresh copy of the model, the method's setup, a Composer Trainer
for a fixed number of batches (two epochs), then an eval. Runs are repeated (``--repeats``, at least 3) in rounds;
each round runs every method once, in an order rotated by one each round, so machine load hits all methods alike.
Per run: median step time after the first (warm-up) batch, training-state bytes (peak over batches, and at the end),
peak process memory growth (RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU). Reported: the median over
runs and the spread (min-max), ratios to full fine-tuning and to each of our algorithms' closest peer, the eval
metric after the budget, and the estimator's prediction next to the measured bytes. The estimator is also checked
against process RSS growth on a larger decoder (:mod:`benchmarks.estimator_check`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import torch
from composer import Callback

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import MemoryProbe, StepRecorder, default_state_counter, median_spread, trim
from benchmarks.methods import METHODS, Method, Task, build_tasks, default_batches

RESULTS = Path(__file__).resolve().parent / 'results'


def run_once(
    task: Task,
    method: Method,
    device: str,
    batches: int,
    evaluate: bool,
    callbacks: Optional[Callable[[StepRecorder], Sequence[Callback]]] = None,
) -> dict[str, Any]:
    """One run of ``method`` on ``task``: train ``batches`` batches, measure, optionally evaluate. ``callbacks``
    makes more callbacks from the run's step recorder; they come right after it, outside the timed span
    (:mod:`benchmarks.scale` measures memory there)."""
    from composer import Trainer

    on_gpu = device == 'gpu'
    with MemoryProbe(on_gpu) as probe:
        setup = method.setup(task, device)
        recorder = StepRecorder(setup.count_state or default_state_counter, on_gpu)
        trainer = Trainer(
            model=setup.model,
            train_dataloader=task.train_loader,
            max_duration=f'{batches}ba',
            optimizers=setup.optimizer,
            algorithms=setup.algorithms,
            callbacks=[recorder, *(callbacks(recorder) if callbacks else ()), *setup.callbacks],
            device=device,
            progress_bar=False,
            log_to_console=False,
            loggers=[],
            seed=17,
            python_log_level=None,
        )
        trainer.fit()
    metric = None
    if evaluate:
        trainer.eval(eval_dataloader=task.eval_loader)
        metrics = next(iter(trainer.state.eval_metrics.values()))
        metric = float(metrics[task.metric].compute())
    trainer.close()
    release_trainer()
    record = recorder.record
    del trainer, setup
    trim()
    steady = record.step_seconds[1:] or record.step_seconds
    return {
        'step_seconds': median_spread(steady)['median'],
        'steady_step_seconds': steady,
        'steady_step_cpu_seconds': record.step_cpu_seconds[1:] or record.step_cpu_seconds,
        'losses': record.losses,
        'peak_state': vars(record.peak) if record.peak else None,
        'last_state': vars(record.last) if record.last else None,
        'trainable_params': record.trainable_params,
        'peak_memory_growth': probe.peak_growth,
        'peak_memory': probe.peak,
        'eval_metric': metric,
    }


def release_trainer() -> None:
    """Let closed Trainers go: Composer registers each Trainer's engine with ``atexit`` (``Engine._close(state,
    logger)``), which keeps every run's model, gradients and optimizer state alive until the process exits."""
    import atexit

    from composer.core.engine import Engine

    atexit.unregister(Engine._close)


def _rotated(items: list, by: int) -> list:
    by %= max(len(items), 1)
    return items[by:] + items[:by]


def _aggregate(task: Task, method: Method, runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    step = median_spread([r['step_seconds'] for r in runs])
    memory = median_spread([r['peak_memory_growth'] for r in runs])
    return {
        'method': method.key,
        'label': method.label,
        'family': method.family,
        'how': method.how,
        'closest_peer': method.closest_peer,
        'available': True,
        'trainable_params': first['trainable_params'],
        'step_seconds': step,
        'samples_per_second': task.batch_size / step['median'],
        'peak_state': first['peak_state'],
        'last_state': first['last_state'],
        'peak_memory_growth': memory,
        'peak_memory': median_spread([r['peak_memory'] for r in runs]),
        'eval_metric': first['eval_metric'],
        'losses': first['losses'],
        'repeats': len(runs),
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {row['method']: row for row in rows if row['available']}
    full = by_key.get('full')

    def ratios(row: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
        return {
            'step_time': row['step_seconds']['median'] / other['step_seconds']['median'],
            'state_bytes': _total(row['peak_state']) / _total(other['peak_state']),
            'state_bytes_at_end': _total(row['last_state']) / _total(other['last_state']),
            'peak_memory_growth': row['peak_memory_growth']['median'] / max(other['peak_memory_growth']['median'], 1),
        }

    for row in by_key.values():
        if full is not None:
            row['vs_full'] = ratios(row, full)
        peer = by_key.get(row.get('closest_peer') or '')
        if peer is not None:
            row['vs_peer'] = ratios(row, peer)


def _total(counts: Optional[dict[str, int]]) -> int:
    return sum(counts.values()) if counts else 0


def estimator_rows(task: Task, methods: list[Method], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The estimator's prediction for full fine-tuning and each of ours, next to the measured training state."""
    from composer_thaw.recipes.memory_estimate import estimate_training_state, spec_of

    measured = {row['method']: row for row in rows if row['available']}
    spec = spec_of(task.base)
    out = []
    for method in methods:
        if method.estimate is None or method.key not in measured:
            continue
        name, options_of = method.estimate
        options = options_of(task)
        at_end = name == 'layer_freezing'  # its peak is the full row; compare the state after the midpoint freeze
        if at_end:
            options = {'freeze_start': 0.0, 'freeze_level': 0.5}  # the schedule's value at the midpoint epoch end
        estimate = estimate_training_state(spec, name, options)
        state = measured[method.key]['last_state' if at_end else 'peak_state']
        out.append(
            {
                'method': method.key,
                'compared_with': 'state at the end' if at_end else 'peak state',
                'predicted': estimate.training_state_bytes,
                'measured': _total(state),
                'relative_error': estimate.training_state_bytes / _total(state) - 1,
                'predicted_split': [estimate.param_bytes, estimate.grad_bytes, estimate.optimizer_state_bytes],
                'measured_split': [state['params'], state['grads'], state['optimizer_state']],
            }
        )
    return out


def environment(device: str) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ('torch', 'transformers', 'mosaicml', 'peft', 'loralib', 'badam', 'hift', 'composer-thaw'):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            cpu = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device == 'gpu' else None
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'device': device,
        'gpu': gpu,
        'cpu': cpu,
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'python': platform.python_version(),
        'versions': versions,
    }


def run(
    quick: bool = True,
    repeats: int = 3,
    batches: Optional[int] = None,
    device: Optional[str] = None,
    tasks: Optional[list[str]] = None,
    methods: Optional[list[str]] = None,
    rss_check: bool = True,
    log=print,
) -> dict[str, Any]:
    """Measure and return the whole result (see :mod:`benchmarks.report` for its layout).

    The allocator keeps glibc's defaults during the runs (pinning the mmap threshold would make every activation a
    fresh mmap and distort step times); each run's memory is measured from a trimmed heap. The estimator check
    afterwards pins it (see :mod:`benchmarks.estimator_check`).
    """
    warnings.filterwarnings('ignore')
    device = device or ('gpu' if torch.cuda.is_available() else 'cpu')
    started = time.perf_counter()
    chosen = [m for m in METHODS if methods is None or m.key in methods]
    runnable, skipped = [], []
    for method in chosen:
        reason = method.unavailable()
        if reason is None:
            runnable.append(method)
        elif method.family == 'ours':
            log(f'skipping {method.label}: {reason}')  # not released yet in this checkout: no row
        else:
            skipped.append((method, reason))
    result: dict[str, Any] = {'environment': environment(device), 'quick': quick, 'repeats': repeats, 'tasks': []}
    budget = batches or default_batches(quick)
    for task in build_tasks(quick, tasks, budget):
        log(
            f'[{time.perf_counter() - started:5.0f}s] {task.title}: {len(runnable)} methods x {repeats} repeats x '
            f'{budget} batches'
        )
        run_once(task, runnable[0], device, 2, evaluate=False)  # warm-up: one-time allocations land in no row
        runs: dict[str, list[dict[str, Any]]] = {m.key: [] for m in runnable}
        for round_index in range(repeats):
            for method in _rotated(runnable, round_index):
                runs[method.key].append(run_once(task, method, device, budget, evaluate=round_index == 0))
        rows = [_aggregate(task, method, runs[method.key]) for method in runnable]
        rows += [
            {
                'method': m.key,
                'label': m.label,
                'family': m.family,
                'how': m.how,
                'available': False,
                'reason': reason,
                'closest_peer': m.closest_peer,
            }
            for m, reason in skipped
        ]
        _add_ratios(rows)
        result['tasks'].append(
            {
                'key': task.key,
                'title': task.title,
                'batches': budget,
                'batch_size': task.batch_size,
                'metric': task.metric,
                'higher_is_better': task.higher_is_better,
                'lr': task.lr,
                'adapter_lr': task.adapter_lr,
                'rows': rows,
                'estimator': estimator_rows(task, runnable, rows),
            }
        )
        del task
        trim()
    if rss_check and device == 'cpu':
        from benchmarks import estimator_check

        hidden, layers = (512, 8) if quick else (768, 12)
        log(
            f'[{time.perf_counter() - started:5.0f}s] estimator vs RSS growth, decoder hidden {hidden}, {layers} layers'
        )
        checks = estimator_check.run_checks(hidden, layers)
        result['rss_check'] = {
            'hidden': hidden,
            'layers': layers,
            'checks': estimator_check.as_json(checks),
            'markdown': estimator_check.markdown(checks, hidden, layers),
        }
    result['seconds'] = time.perf_counter() - started
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from benchmarks import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small budgets: under 5 minutes on 2 CPU cores')
    parser.add_argument('--repeats', type=int, default=3, help='runs per method and task (at least 3 to report spread)')
    parser.add_argument(
        '--batches', type=int, default=None, help='training batches per run, two epochs (default 4 quick, 40 full)'
    )
    parser.add_argument('--device', choices=['cpu', 'gpu'], default=None, help='default: gpu when CUDA is available')
    parser.add_argument('--tasks', nargs='*', default=None, help='minilm, decoder-s, decoder-m (default: all)')
    parser.add_argument('--methods', nargs='*', default=None, help=f'default: all of {[m.key for m in METHODS]}')
    parser.add_argument('--no-rss-check', dest='rss_check', action='store_false')
    parser.add_argument('--output-dir', type=Path, default=RESULTS)
    parser.add_argument('--no-plots', dest='plots', action='store_false')
    parser.add_argument('--update-readme', action='store_true', help='replace the benchmark section of README.md')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be at least 1')
    result = run(args.quick, args.repeats, args.batches, args.device, args.tasks, args.methods, args.rss_check)
    paths = report.write(result, args.output_dir, plots=args.plots)
    print(report.markdown(result))
    print('\nWrote ' + ', '.join(str(p) for p in paths))
    if args.update_readme:
        print(f'Updated {report.update_readme(result, paths)}')
    return result


if __name__ == '__main__':
    main()
