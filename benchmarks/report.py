"""Write a benchmark result: a Markdown table, a JSON file, and PNG plots (memory bars, loss curves).

Files (in ``benchmarks/results/`` by default): ``bench-<date>-<quick|full>.json`` and ``.md`` per run, plus
``latest.json``, ``latest.md``, ``memory.png`` and ``loss.png`` for the most recent one (what the README and the
comparison notebook show).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from composer_thaw.utils.atomic_files import atomic_write_text

__all__ = ['load', 'markdown', 'plot_loss', 'plot_memory', 'update_readme', 'write']

MIB = 2**20
README = Path(__file__).resolve().parents[1] / 'README.md'
README_START, README_END = '<!-- benchmark:start -->', '<!-- benchmark:end -->'


def _mib(n: float) -> str:
    return f'{n / MIB:.1f}'


def _spread(stats: dict[str, float], scale: float = 1000.0, digits: int = 1) -> str:
    return f'{stats["median"] * scale:.{digits}f} ({stats["min"] * scale:.{digits}f}-{stats["max"] * scale:.{digits}f})'


def _ratio(row: dict[str, Any], which: str, key: str) -> str:
    ratios = row.get(which)
    return f'{ratios[key]:.2f}x' if ratios else ''


def _metric(task: dict[str, Any], value: Any) -> str:
    if value is None:
        return ''
    return f'{value:.1%}' if task['metric'].endswith('Accuracy') else f'{value:.3f}'


def task_table(task: dict[str, Any]) -> str:
    metric = 'eval accuracy' if task['metric'].endswith('Accuracy') else 'eval loss'
    lines = [
        f'**{task["title"]}**, {task["batches"]} batches per run (2 epochs), lr {task["lr"]:g} '
        f'(LoRA rows {task["adapter_lr"]:g}):',
        '',
        '| method | trainable params | step ms, median (min-max) | samples/s | step vs full | step vs peer '
        '| training state MiB: params + grads + optimizer = total (peak) | vs full | vs peer | at end MiB '
        f'| peak memory growth MiB | {metric} |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in task['rows']:
        if not row['available']:
            lines.append(f'| {row["label"]} | not run: {row["reason"]} |' + ' |' * 10)
            continue
        peak, last = row['peak_state'], row['last_state']
        peer = f' (peer: {row["closest_peer"]})' if row.get('vs_peer') else ''
        lines.append(
            f'| {row["label"]}{peer} | {row["trainable_params"]:,} | {_spread(row["step_seconds"])} | '
            f'{row["samples_per_second"]:.1f} | {_ratio(row, "vs_full", "step_time")} | '
            f'{_ratio(row, "vs_peer", "step_time")} | {_mib(peak["params"])} + {_mib(peak["grads"])} + '
            f'{_mib(peak["optimizer_state"])} = **{_mib(sum(peak.values()))}** | '
            f'{_ratio(row, "vs_full", "state_bytes")} | {_ratio(row, "vs_peer", "state_bytes")} | '
            f'{_mib(sum(last.values()))} | {_spread(row["peak_memory_growth"], 1 / MIB, 0)} | '
            f'{_metric(task, row["eval_metric"])} |'
        )
    if task.get('estimator'):
        errors = ', '.join(f'{e["method"]} {e["relative_error"]:+.2%}' for e in task['estimator'])
        lines += ['', f'Estimator (`thaw estimate`) vs measured training state: {errors}.']
    return '\n'.join(lines)


def markdown(result: dict[str, Any]) -> str:
    env = result['environment']
    versions = ', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)
    where = (
        f'GPU {env["gpu"]}'
        if env['device'] == 'gpu'
        else (f'CPU ({env["cpu"]}, {env["cpu_count"]} cores, {env["torch_threads"]} torch thread(s))')
    )
    memory = (
        'peak `torch.cuda.max_memory_allocated` growth'
        if env['device'] == 'gpu'
        else 'peak process RSS growth over the run (model copy, setup, training)'
    )
    parts = [
        f'Measured {env["date"]} on {where}; {"quick" if result["quick"] else "full"} budget, '
        f'{result["repeats"]} interleaved repeats per method; {versions}.',
        '',
        f"Step time: median of the runs' median step (first batch excluded), spread min-max over runs. Training "
        f'state: bytes of parameters, gradients and optimizer state on the training device, peak over batches '
        f'(`at end`: after the last batch). Peak memory: {memory}. "vs peer": ours against its closest peer '
        '(LayerFreezing: Composer LayerFreezing; RegexFreeze: a hand-written requires_grad freeze; LoRAInject: PEFT; '
        'HiFTRotation: the hift package).',
    ]
    notes = {}
    for task in result['tasks']:
        for row in task['rows']:
            if row.get('how', 'Composer Trainer') != 'Composer Trainer':
                notes[row['label']] = row['how']
    if notes:
        parts += ['', "How peers run where the plain way does not work: every method runs in Composer's Trainer;"]
        parts += [f'- {label}: {how}.' for label, how in notes.items()]
    for task in result['tasks']:
        parts += ['', task_table(task)]
    if result.get('rss_check'):
        parts += ['', result['rss_check']['markdown']]
    parts += ['', f'Total time {result["seconds"]:.0f} s.']
    return '\n'.join(parts)


def plot_memory(result: dict[str, Any], path: Path) -> Path:
    """Stacked bars per task: parameters, gradients and optimizer state (peak) of each method."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tasks = result['tasks']
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in task['rows'] if r['available']]
        labels = [r['label'].replace('ours: ', '*') for r in rows]
        bottom = [0.0] * len(rows)
        for key, color in (('params', '#4c72b0'), ('grads', '#dd8452'), ('optimizer_state', '#55a868')):
            values = [r['peak_state'][key] / MIB for r in rows]
            ax.barh(labels, values, left=bottom, color=color, label=key.replace('_', ' '))
            bottom = [b + v for b, v in zip(bottom, values)]
        ends = [sum(r['last_state'].values()) / MIB for r in rows]
        ax.plot(ends, labels, 'k|', markersize=16, markeredgewidth=2, label='total after the last batch')
        ax.invert_yaxis()
        ax.set_xlabel('MiB (peak training state)')
        ax.set_title(task['key'], fontsize=10)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc='lower center', ncol=4, fontsize=9)
    fig.suptitle('Training-state bytes per method (* = composer-thaw)', fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss(result: dict[str, Any], path: Path) -> Path:
    """Training loss per batch of the first run of each method, one panel per task."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tasks = result['tasks']
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in task['rows']:
            if row['available']:
                style = '-' if row['family'] != 'peer' else '--'
                ax.plot(range(1, len(row['losses']) + 1), row['losses'], style, label=row['label'], linewidth=1.2)
        ax.set_xlabel('batch')
        ax.set_ylabel('training loss')
        ax.set_title(task['key'], fontsize=10)
    axes[0][-1].legend(fontsize=7, loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(result: dict[str, Any], directory: Path, plots: bool = True) -> list[Path]:
    """Write the run's JSON and Markdown (dated, and as ``latest``) and, with ``plots``, the PNGs."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r'[^0-9]', '', result['environment']['date'])[:12]
    name = f'bench-{stamp}-{"quick" if result["quick"] else "full"}'
    text = json.dumps(result, indent=1) + '\n'
    table = markdown(result) + '\n'
    paths = []
    for stem in (name, 'latest'):
        atomic_write_text(directory / f'{stem}.json', text)
        atomic_write_text(directory / f'{stem}.md', table)
        paths += [directory / f'{stem}.json', directory / f'{stem}.md']
    if plots:
        paths += [plot_memory(result, directory / 'memory.png'), plot_loss(result, directory / 'loss.png')]
    return paths


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def update_readme(result: dict[str, Any], paths: list[Path], readme: Path = README) -> Path:
    """Replace the text between the benchmark markers in the README with this run's tables and plot."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f'{readme} has no {README_START} ... {README_END} section to replace.')
    root = readme.parent
    images = [p for p in paths if p.suffix == '.png']
    body = [markdown(result)]
    for image in images:
        body.append(f'![{image.stem}]({image.resolve().relative_to(root.resolve())})')
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(readme, f'{head}{README_START}\n{chr(10).join(body)}\n{README_END}{tail}')
    return readme
