"""``master_weights='fp32'`` benchmark: each algorithm in fp32, in bf16 with fp32 masters, and in pure bf16.

    python -m benchmarks.master_weights_bench                  # decoder-s, 8 batches: about 1 minute on 2 cores
    python -m benchmarks.master_weights_bench --task minilm --batches 40   # the demo task's classifier, with quality
    python -m benchmarks.master_weights_bench --predicted-only  # the Llama 3-8B table of predicted device bytes
    python -m benchmarks.master_weights_bench --quality         # the demo task's recipes: over an hour on 2 cores
    python -m benchmarks.master_weights_bench --quality --resume  # the runs not yet in its saved results

For every algorithm (full fine-tuning, LayerFreezing, RegexFreeze, LoRAInject, HiFTRotation, with the options of
:mod:`benchmarks.methods`) and every precision:

* ``fp32``: fp32 weights, fp32 AdamW state (today's default);
* ``bf16 + masters``: the model in bf16, the algorithm with ``master_weights='fp32'`` (full fine-tuning: the masters
  enabled on the whole optimizer);
* ``bf16``: the model in bf16 and nothing else: bf16 AdamW state, updates below bf16's resolution lost.

each a fresh copy of the task's model in Composer's Trainer with ``precision='fp32'`` (the compute follows the
weights' dtype), the same batches and seed. Reported: the training-state bytes after a step, split into parameters,
gradients, optimizer state and fp32 masters (the masters' low-precision gradients are released by the step, so
``grads`` is the fp32 parameters' only), median step time and its ratio to the same algorithm in fp32, and the eval
metric. Writes ``benchmarks/results/master_weights.json`` and ``.md``.

``--quality`` trains the demo task (the embedded MiniLM on ``stdlib-docs``) with each algorithm's shipped recipe
(``yamls/demo.yaml`` for RegexFreeze, ``yamls/<algorithm>_minilm.yaml`` for the others), unchanged but for the
precision: ``model.dtype`` and the algorithm's ``master_weights``. Its acceptance: every algorithm with masters within
1 point of eval accuracy of the same recipe in fp32. Writes ``benchmarks/results/master_weights_quality.*``. Its bf16
runs compute each matrix product as a GPU does, bf16 inputs summed in fp32 and rounded to bf16, through fp32 GEMMs
(:mod:`benchmarks.bf16_matmul`): on a CPU without bf16 instructions torch's bf16 GEMM is ~50 times slower.

The predicted table (``--predicted-only``, also printed after a run) is the estimator's device bytes for
Llama 3-8B next to BAdam's formula ``2M + 16M/D`` GB (M billions of parameters, D blocks) and AdamW in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import torch
from composer.core import Callback, State
from composer.loggers import Logger

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bf16_matmul import Bf16ProductsInFp32
from benchmarks.measure import median_spread, trim
from benchmarks.methods import Task, _lora_options, build_tasks
from composer_thaw.utils.master_weights import enable_master_weights
from composer_thaw.utils.optimizer_surgery import training_state_bytes

RESULTS = Path(__file__).resolve().parent / 'results'
YAMLS = Path(__file__).resolve().parents[1] / 'yamls'
QUALITY_RECIPES = {
    'regex_freeze': 'demo.yaml',
    'layer_freezing': 'layer_freezing_minilm.yaml',
    'lora_inject': 'lora_minilm.yaml',
    'hift_rotation': 'hift_minilm.yaml',
}
QUALITY_TOLERANCE = 0.01  # one point of accuracy
PRECISIONS = ('fp32', 'bf16 + masters', 'bf16')
GIB = 2**30


def _algorithms(task: Task, masters: Optional[str]) -> dict[str, list[Any]]:
    from composer_thaw.hift_rotation import HiFTRotation
    from composer_thaw.layer_freezing import LayerFreezing
    from composer_thaw.lora_inject import LoRAInject
    from composer_thaw.regex_freeze import RegexFreeze

    return {
        'full': [],
        'layer_freezing': [LayerFreezing(freeze_start=0.0, freeze_level=1.0, master_weights=masters)],
        'regex_freeze': [RegexFreeze(trainable=task.top_patterns, master_weights=masters)],
        'lora_inject': [LoRAInject(**_lora_options(task), master_weights=masters)],
        'hift_rotation': [HiFTRotation(group_size=1, strategy='down2up', master_weights=masters)],
    }


class _FullMasters(Callback):
    """Full fine-tuning with masters: no algorithm decides what trains, so enable them on the whole optimizer."""

    def fit_start(self, state: State, logger: Logger) -> None:
        enable_master_weights(state.model, state.optimizers, 'fp32')


class _Recorder(Callback):
    """Per batch: wall time and the bytes after the step, masters apart; the peak over batches."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.peak: dict[str, int] = {}
        self._started = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        import time

        self._started = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        import time

        self.step_seconds.append(time.perf_counter() - self._started)
        counts = training_state_bytes(state.model, state.optimizers)
        now = {
            'params': counts.params,
            'grads': counts.grads,
            'optimizer_state': counts.optimizer_state,
            'masters': counts.masters,
        }
        if sum(now.values()) > sum(self.peak.values()):
            self.peak = now


def run_once(task: Task, algorithm: str, precision: str, batches: int) -> dict[str, Any]:
    from composer import Trainer

    model = task.fresh_model()
    if precision != 'fp32':
        model = model.to(torch.bfloat16)
    masters = 'fp32' if precision == 'bf16 + masters' else None
    lr = task.adapter_lr if algorithm == 'lora_inject' else task.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    recorder = _Recorder()
    callbacks: list[Callback] = [recorder]
    if algorithm == 'full' and masters:
        callbacks.append(_FullMasters())
    trainer = Trainer(
        model=model,
        train_dataloader=task.train_loader,
        max_duration=f'{batches}ba',
        optimizers=optimizer,
        algorithms=_algorithms(task, masters)[algorithm],
        callbacks=callbacks,
        device='cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=17,
        python_log_level=None,
    )
    trainer.fit()
    trainer.eval(eval_dataloader=task.eval_loader)
    metric = float(next(iter(trainer.state.eval_metrics.values()))[task.metric].compute())
    trainer.close()
    steady = recorder.step_seconds[1:] or recorder.step_seconds
    result = {
        'algorithm': algorithm,
        'precision': precision,
        'step_seconds': median_spread(steady)['median'],
        'bytes': recorder.peak,
        'eval_metric': metric,
    }
    del trainer, model, optimizer
    trim()
    return result


def quality_once(algorithm: str, precision: str, seed: Optional[int] = None) -> dict[str, Any]:
    """The demo task trained by ``algorithm``'s shipped recipe in ``precision`` (with ``seed`` instead of the recipe's
    when given); its eval accuracy and cost."""
    from composer_thaw.recipes.running import run_recipe
    from composer_thaw.recipes.schema import load_recipe

    overrides = ['progress_bar=false']
    if seed is not None:
        overrides.append(f'seed={seed}')
    if precision != 'fp32':
        overrides.append('model.dtype=bfloat16')
    if precision == 'bf16 + masters':
        overrides.append(f'algorithms.{algorithm}.master_weights=fp32')
    # bf16 products as a GPU computes them, through fp32 GEMMs: torch's own bf16 GEMM is ~50x slower on AVX2 CPUs.
    with Bf16ProductsInFp32() if precision != 'fp32' else contextlib.nullcontext():
        recipe = load_recipe(YAMLS / QUALITY_RECIPES[algorithm], overrides)
        summary = run_recipe(recipe)
    trim()
    return {
        'algorithm': algorithm,
        'recipe': f'yamls/{QUALITY_RECIPES[algorithm]}',
        'precision': precision,
        'seed': recipe.seed,
        'accuracy': summary.eval_metrics['eval/MulticlassAccuracy'],
        'training_state_bytes': summary.training_state_bytes,
        'samples_per_second': summary.samples_per_second,
    }


def _seed(result: dict[str, Any]) -> Any:
    return result.get('seed', 17)  # results saved before seeds were recorded ran the recipes' own seed, 17


def quality_markdown(results: list[dict[str, Any]]) -> str:
    fp32 = {(r['algorithm'], _seed(r)): r['accuracy'] for r in results if r['precision'] == 'fp32'}
    lines = [
        "The demo task (embedded all-MiniLM-L6-v2, `stdlib-docs`, 6 classes) trained by each algorithm's shipped "
        'recipe, changed only in precision; CPU, bf16 matrix products as a GPU computes them (fp32 sums rounded to '
        'bf16, `benchmarks/bf16_matmul.py`). Acceptance: bf16 + masters within 1 point of fp32. The bytes of each '
        'precision, split into weights, gradients, optimizer state and masters: `master_weights.md`.',
        '',
        '| algorithm | recipe | precision | seed | eval accuracy | vs fp32 (points) | samples/s | within 1 point |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        points = 100 * (r['accuracy'] - fp32[r['algorithm'], _seed(r)])
        verdict = (
            ('yes' if abs(points) <= 100 * QUALITY_TOLERANCE else 'NO') if r['precision'] == 'bf16 + masters' else ''
        )
        lines.append(
            f'| {r["algorithm"]} | `{r["recipe"]}` | {r["precision"]} | {_seed(r)} | {r["accuracy"]:.4f} | '
            f'{points:+.2f} | {r["samples_per_second"]:.1f} | {verdict} |'
        )
    return '\n'.join(lines + _seed_summary(results))


def _seed_summary(results: list[dict[str, Any]]) -> list[str]:
    """For each algorithm run over several seeds: each precision's mean accuracy, its spread, and the mean's distance
    to fp32's (the acceptance reads the mean: one seed's noise on 357 examples exceeds a point)."""
    by_run: dict[tuple[str, str], dict[Any, float]] = {}
    for r in results:
        by_run.setdefault((r['algorithm'], r['precision']), {})[_seed(r)] = r['accuracy']
    lines: list[str] = []
    for algorithm in dict.fromkeys(r['algorithm'] for r in results):
        runs = {p: by_run.get((algorithm, p), {}) for p in PRECISIONS}
        seeds = sorted(set.intersection(*(set(accuracies) for accuracies in runs.values())))
        if len(seeds) < 2:
            continue
        if not lines:
            lines = ['', 'Over several seeds (the seeds every precision ran; spread: lowest to highest, and the '
                     'standard deviation):', '',
                     '| algorithm | seeds | precision | mean accuracy | spread | std | mean vs fp32 (points) | '
                     'within 1 point |', '|---|---|---|---|---|---|---|---|']  # fmt: skip
        mean_fp32 = statistics.mean(runs['fp32'][s] for s in seeds)
        for precision, accuracies in runs.items():
            values = [accuracies[s] for s in seeds]
            mean = statistics.mean(values)
            points = 100 * (mean - mean_fp32)
            verdict = (
                ('yes' if abs(points) <= 100 * QUALITY_TOLERANCE else 'NO') if precision == 'bf16 + masters' else ''
            )
            lines.append(
                f'| {algorithm} | {", ".join(map(str, seeds))} | {precision} | {mean:.4f} | '
                f'{min(values):.4f}-{max(values):.4f} | {statistics.stdev(values):.4f} | {points:+.2f} | {verdict} |'
            )
    return lines


def predicted_rows() -> list[dict[str, Any]]:
    """Predicted device bytes for Llama 3-8B, bf16 weights with fp32 masters, next to AdamW fp32 and BAdam's formula."""
    from composer_thaw.recipes.memory_estimate import estimate_training_state, load_model_config

    spec = load_model_config('llama-3-8b')
    masters = {'master_weights': 'fp32'}
    all_linear = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
    cases = [
        ('AdamW, fp32 weights', 'full', {}),
        ('full-parameter, bf16 + masters', 'full', masters),
        ('HiFT group_size 1, decoder blocks (embeddings, norm, head frozen)', 'hift_rotation',
         {'group_size': 1, 'freeze': [0, 33, 34], **masters}),
        ('HiFT group_size 1, every unit (embeddings and head rotate too)', 'hift_rotation',
         {'group_size': 1, **masters}),
        ('LayerFreezing at half (block granularity)', 'layer_freezing',
         {'freeze_start': 0.0, 'freeze_level': 0.5, 'granularity': 'block', **masters}),
        ('RegexFreeze top quarter (layers 24-31, norm, head)', 'regex_freeze',
         {'trainable': [r'model\.layers\.(2[4-9]|3[01])\.', r'model\.norm', 'lm_head'], 'syntax': 'regex', **masters}),
        ('LoRA r=16, all linear layers', 'lora_inject',
         {'r': 16, 'lora_alpha': 32, 'target_modules': all_linear, **masters}),
    ]  # fmt: skip
    rows = []
    for label, algorithm, options in cases:
        estimate = estimate_training_state(spec, algorithm, options)
        rows.append(
            {
                'label': label,
                'algorithm': algorithm,
                'options': options,
                'trainable_params': estimate.trainable_params,
                'params': estimate.param_bytes,
                'grads': estimate.grad_bytes,
                'optimizer_state': estimate.optimizer_state_bytes,
                'masters': estimate.master_bytes + estimate.step_grad_bytes,
                'total': estimate.training_state_bytes,
                'offloaded': estimate.offloaded_state_bytes,
                'host_device_per_step': estimate.transfer_bytes_per_step,
            }
        )
    billions, blocks = estimate_training_state(spec, 'full').total_params / 1e9, spec.config.num_hidden_layers
    badam = (2 * billions + 16 * billions / blocks) * 1e9
    rows.append({'label': f'BAdam formula 2M + 16M/D (M={billions:.2f}, D={blocks})', 'total': int(badam)})
    return rows


def predicted_markdown(rows: list[dict[str, Any]]) -> str:
    def gib(n: Optional[int]) -> str:
        return f'{n / GIB:.2f}' if n else '-'

    lines = [
        'Predicted training state on the device for Llama 3-8B (8.03B parameters), AdamW, activations not included '
        '(`thaw estimate`; GiB). Masters: fp32 master copies plus the growth of their gradients to fp32 during the '
        "step. Offloaded: what HiFT keeps in host memory, the other groups' fp32 optimizer state and masters. "
        "Host<->device: HiFT's offloaded state and masters, out and in, per step.",
        '',
        '| configuration | trainable params | weights | grads | optimizer state | masters | **total** | offloaded '
        '| host<->device per step |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for row in rows:
        trainable = f'{row["trainable_params"]:,}' if 'trainable_params' in row else '-'
        lines.append(
            f'| {row["label"]} | {trainable} | {gib(row.get("params"))} | {gib(row.get("grads"))} | '
            f'{gib(row.get("optimizer_state"))} | {gib(row.get("masters"))} | **{row["total"] / GIB:.2f}** | '
            f'{gib(row.get("offloaded"))} | {gib(row.get("host_device_per_step"))} |'
        )
    return '\n'.join(lines)


def measured_markdown(task: Task, results: list[dict[str, Any]], batches: int) -> str:
    mib = 2**20
    fp32_step = {r['algorithm']: r['step_seconds'] for r in results if r['precision'] == 'fp32'}
    lines = [
        f'**{task.title}**, {batches} batches per run, AdamW, Composer precision fp32, CPU. Bytes after a step '
        '(peak over batches), MiB: weights + grads + optimizer state + fp32 masters.',
        '',
        f'| algorithm | precision | weights | grads | optimizer state | masters | total | step ms | step vs fp32 '
        f'| eval {task.metric} |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        b = r['bytes']
        lines.append(
            f'| {r["algorithm"]} | {r["precision"]} | {b["params"] / mib:.1f} | {b["grads"] / mib:.1f} | '
            f'{b["optimizer_state"] / mib:.1f} | {b["masters"] / mib:.1f} | **{sum(b.values()) / mib:.1f}** | '
            f'{r["step_seconds"] * 1000:.1f} | {r["step_seconds"] / fp32_step[r["algorithm"]]:.2f}x | '
            f'{r["eval_metric"]:.4f} |'
        )
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', default='decoder-s', choices=['decoder-s', 'decoder-m', 'minilm'])
    parser.add_argument('--batches', type=int, default=8)
    parser.add_argument('--algorithms', nargs='*', default=None)
    parser.add_argument('--predicted-only', action='store_true')
    parser.add_argument('--quality', action='store_true', help="the demo task's recipes in each precision")
    parser.add_argument(
        '--resume', action='store_true', help='with --quality: keep the results already saved, run only the others'
    )
    parser.add_argument(
        '--seeds', type=int, nargs='*', default=None, help="with --quality: these instead of the recipe's"
    )
    parser.add_argument('--output', type=Path, default=RESULTS / 'master_weights')
    args = parser.parse_args(argv)
    if args.quality:
        names = args.algorithms or list(QUALITY_RECIPES)
        output = args.output.with_name(args.output.name + '_quality')
        output.parent.mkdir(parents=True, exist_ok=True)
        saved = output.with_suffix('.json')
        quality: list[dict[str, Any]] = json.loads(saved.read_text()) if args.resume and saved.exists() else []
        done = {(r['algorithm'], r['precision'], _seed(r)) for r in quality}
        for algorithm in names:
            for seed in args.seeds or [None]:
                for precision in PRECISIONS:
                    if (algorithm, precision, 17 if seed is None else seed) in done:
                        continue
                    quality.append(quality_once(algorithm, precision, seed))
                    print(json.dumps(quality[-1]), flush=True)  # a long run: each result as it comes, and saved
                    saved.write_text(json.dumps(quality, indent=1))
        text = quality_markdown(quality)
        print(text)
        output.with_suffix('.md').write_text(text + '\n')
        return
    predicted = predicted_rows()
    sections = [predicted_markdown(predicted)]
    measured: list[dict[str, Any]] = []
    if not args.predicted_only:
        torch.manual_seed(0)
        task = build_tasks(quick=True, only=[args.task], batches=args.batches)[0]
        names: list[str] = args.algorithms or list(_algorithms(task, None))
        run: Callable[[str, str], dict[str, Any]] = lambda a, p: run_once(task, a, p, args.batches)  # noqa: E731
        measured = [run(algorithm, precision) for algorithm in names for precision in PRECISIONS]
        sections.insert(0, measured_markdown(task, measured, args.batches))
    text = '\n\n'.join(sections)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix('.md').write_text(text + '\n')
    args.output.with_suffix('.json').write_text(json.dumps({'predicted': predicted, 'measured': measured}, indent=1))


if __name__ == '__main__':
    main()
