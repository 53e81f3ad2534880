"""HiFTRotation benchmark: training-state bytes and step time against full fine-tuning, the ``hift`` package's update
rule and BAdam; optionally eval accuracy on the demo task.

Quick part (``python -m benchmarks.hift_bench``, about 2 minutes on one CPU thread): the embedded MiniLM classifier
(22.7M parameters, 9 HiFT units), the same batches (8 x 64 tokens of the demo's docstring data) and the same number
of steps (two HiFT passes) for each method, AdamW throughout:

* ``full``: plain fine-tuning.
* ``HiFTRotation``: our :class:`~composer_thaw.hift_rotation.GroupRotation` (group_size 1, ``down2up``), offloaded
  state.
* ``hift (by hand)``: ``import hift`` fails with this transformers and its own optimizers need bitsandbytes, so this
  is the package's grouping (``registerCallBack`` loaded by file path) with ``HiFTrainer.update_parameter_state``'s
  rule transcribed: every step the head group of its queue becomes the param groups, ``optimizer.state`` keeps every
  parameter's state (with ``torch.optim.AdamW``; the package's own optimizers copy each state to the CPU and back at
  every step instead).
* ``BAdam``: ``badam.BlockOptimizer`` over the same units, switching every step in ascending order (it keeps an fp32
  copy of the active block and resets its state at each switch).

Measured per method: parameter bytes (plus BAdam's fp32 copies), peak gradient bytes, peak resident optimizer
state (tensors in ``optimizer.state``; what lives on the accelerator on a GPU run), state kept elsewhere (ours:
offloaded to CPU memory), and the median step time. On CPU "on the device" and "offloaded" are the same memory; the
split is what a GPU run would keep on the GPU. There is no GPU in this task, so HiFT's fp32-master-copy mixed
precision is not measured.

``--accuracy`` adds the demo task (``yamls/demo.yaml``: MiniLM, 6-class docstring classification, 2 epochs, AdamW
1e-4, linear warmup, gradient clipping) run by the recipe runner, full fine-tuning against ``HiFTRotation``
(about 6 minutes on 2 cores). Prints a Markdown table and writes ``benchmarks/results/hift_rotation.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from torch import nn

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from composer_thaw.datasets.builtin import ClassificationDataset, build_dataloader, stdlib_docs_examples
from composer_thaw.hift_rotation import GroupRotation, rotation_units
from composer_thaw.models.builtin import load_tokenizer, minilm_classifier
from composer_thaw.utils.atomic_files import atomic_write_text
from composer_thaw.utils.optimizer_surgery import optimizer_state_bytes
from composer_thaw.utils.parameter_selection import user_module

RESULTS = Path(__file__).resolve().parent / 'results' / 'hift_rotation.json'
HIFT_REGISTER = Path(torch.__file__).resolve().parents[1] / 'hift' / 'registerCallBack.py'
LR = 1e-4


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return user_module(minilm_classifier(num_labels=6))


def batches(count: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    tokenizer = load_tokenizer()
    train, _ = stdlib_docs_examples()
    dataset = ClassificationDataset(train, tokenizer, seq_len)
    torch.manual_seed(0)
    loader = build_dataloader(dataset, tokenizer, batch_size, shuffle=True, drop_last=True)
    out = []
    while len(out) < count:
        out.extend(loader)
    return out[:count]


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Method:
    """One way to train: ``before_step`` and ``optimizer`` around a shared forward/backward."""

    name = ''

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer = adamw(model.parameters())

    def before_step(self) -> None:
        pass

    def step(self) -> None:
        self.optimizer.step()

    def resident_state(self) -> int:
        return optimizer_state_bytes(self.optimizer)

    def elsewhere_state(self) -> int:
        return 0

    def extra_param_bytes(self) -> int:
        return 0


class Full(Method):
    name = 'full fine-tuning'


class Ours(Method):
    name = 'HiFTRotation (group_size=1, offload)'

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.rotation = GroupRotation(model, self.optimizer, group_size=1, strategy='down2up')

    def before_step(self) -> None:
        self.rotation.before_step()

    def elsewhere_state(self) -> int:
        return self.rotation.offloaded_bytes()


def load_hift_register():
    spec = importlib.util.spec_from_file_location('hift_register_callback', HIFT_REGISTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HiftByHand(Method):
    """The package's grouping and ``HiFTrainer.update_parameter_state`` (decay / no-decay groups of the head group)."""

    name = 'hift package rule (by hand, torch AdamW)'

    def __init__(self, model: nn.Module):
        from peft import TaskType

        super().__init__(model)
        self.handler = load_hift_register().GetCallBack('bert')([], 'down2up', TaskType.SEQ_CLS)
        self.queue = self.handler.group_model(model)
        self.pattern = re.compile('|'.join(self.handler.pattern_list))
        self.hyper = [{k: v for k, v in group.items() if k != 'params'} for group in self.optimizer.param_groups]

    def before_step(self) -> None:
        head = self.queue[:1]
        self.queue = self.queue[1:] + head
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            param.requires_grad = self.handler.check_selection(head, self.pattern.findall(name))
            if param.requires_grad:
                (no_decay if 'bias' in name or 'LayerNorm' in name else decay).append(param)
        self.optimizer.param_groups = [
            {**self.hyper[0], 'params': decay},
            {**self.hyper[0], 'weight_decay': 0.0, 'params': no_decay},
        ]


class BAdam(Method):
    name = 'BAdam BlockOptimizer (switch every step)'

    def __init__(self, model: nn.Module):
        import warnings

        from badam import BlockOptimizer

        self.model = model
        prefixes = [[unit.name + '.'] for unit in rotation_units(model)]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # it warns that the model is fp32 (it expects fp16/bf16 weights)
            self.optimizer = BlockOptimizer(
                adamw(model.parameters()),
                list(model.named_parameters()),
                prefixes,
                switch_block_every=1,
                switch_mode='ascending',
                verbose=0,
            )
        self.peak_state = 0
        # BAdam drops the state when it switches blocks inside step(): measure right after the base step
        self.optimizer.base_optimizer.register_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        self.peak_state = max(self.peak_state, optimizer_state_bytes(optimizer))

    def resident_state(self) -> int:
        return self.peak_state

    def extra_param_bytes(self) -> int:
        return tensor_bytes(self.optimizer.param_idx2hp.values())  # fp32 copies of the active block


def measure(method_cls: Callable[[nn.Module], Method], data: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    model = build_model()
    model.train()
    method = method_cls(model)
    times, grads, resident, elsewhere, extra = [], 0, 0, 0, 0
    for batch in data:
        start = time.perf_counter()
        method.before_step()
        model(**batch).loss.backward()
        grads = max(grads, tensor_bytes(p.grad for p in model.parameters() if p.grad is not None))
        method.step()
        for param in model.parameters():
            param.grad = None
        times.append(time.perf_counter() - start)
        resident = max(resident, method.resident_state())
        elsewhere = max(elsewhere, method.elsewhere_state())
        extra = max(extra, method.extra_param_bytes())
    params = tensor_bytes(model.parameters())
    return {
        'method': method.name,
        'param_bytes': params + extra,
        'peak_grad_bytes': grads,
        'peak_resident_optimizer_state_bytes': resident,
        'optimizer_state_elsewhere_bytes': elsewhere,
        'training_state_on_device_bytes': params + extra + grads + resident,
        'median_step_seconds': statistics.median(times[1:]),
    }


def unit_table(model: nn.Module) -> list[dict[str, Any]]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    rows = []
    for index, unit in enumerate(rotation_units(model)):
        numel = sum(params[n].numel() for n in unit.parameter_names)
        rows.append(
            {
                'index': index,
                'unit': unit.name,
                'params': numel,
                'share': numel / total,
                'adamw_state_bytes': 2 * 4 * numel + 4 * len(unit.parameter_names),
            }
        )
    return rows


def demo_recipe(overrides: list[str]):
    """``yamls/demo.yaml`` as full fine-tuning (its RegexFreeze dropped, lr 1e-4), with ``overrides`` applied."""
    import yaml

    from composer_thaw.recipes.schema import apply_overrides, recipe_from_mapping, validate_recipe

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / 'yamls' / 'demo.yaml').read_text())
    data['algorithms'].pop('regex_freeze', None)
    data['optimizer']['lr'] = LR
    data['progress_bar'] = False
    recipe = recipe_from_mapping(apply_overrides(data, overrides))
    validate_recipe(recipe)
    return recipe


ACCURACY_RUNS = {
    'full fine-tuning': [],
    'HiFTRotation group_size=1': ['algorithms.hift_rotation.group_size=1'],
    'HiFTRotation group_size=1, lr x3': ['algorithms.hift_rotation.group_size=1', 'optimizer.lr=3.0e-4'],
    'HiFTRotation group_size=1, head always on, lr x3': [
        'algorithms.hift_rotation.group_size=1',
        'algorithms.hift_rotation.always_trainable=[classifier]',
        'optimizer.lr=3.0e-4',
    ],
}


def accuracy(budget: list[str], runs: list[str]) -> dict[str, Any]:
    from composer_thaw.recipes.running import run_recipe

    out = {}
    for name in runs:
        start = time.perf_counter()
        summary = run_recipe(demo_recipe(budget + ACCURACY_RUNS[name]))
        out[name] = {
            'eval_accuracy': summary.eval_metrics.get('eval/MulticlassAccuracy'),
            'peak_optimizer_state_bytes': summary.optimizer_state_bytes,
            'peak_grad_bytes': summary.grad_bytes,
            'train_batches': summary.train_batches,
            'seconds': round(time.perf_counter() - start, 1),
        }
        print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--passes', type=int, default=2, help='HiFT passes (9 steps each) per method')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq', type=int, default=64)
    parser.add_argument('--accuracy', action='store_true', help='also run the demo task, full vs HiFTRotation')
    parser.add_argument('--budget', action='append', default=[], help='recipe override for the accuracy runs')
    parser.add_argument('--runs', nargs='*', default=list(ACCURACY_RUNS), help='which accuracy runs')
    parser.add_argument('--skip-quick', action='store_true', help='only the accuracy runs')
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = build_model()
    units = unit_table(model)
    rows: list[dict[str, Any]] = []
    if not args.skip_quick:
        data = batches(len(units) * args.passes + 1, args.batch, args.seq)
        rows = [measure(cls, data) for cls in (Full, Ours, HiftByHand, BAdam)]
    result: dict[str, Any] = {'setup': vars(args), 'units': units, 'methods': rows}
    if args.accuracy:
        result['accuracy'] = accuracy(args.budget, args.runs)

    mib = 2**20
    print('| unit | params | share | AdamW state |\n|---|---:|---:|---:|')
    for row in units:
        print(
            f'| {row["index"]} {row["unit"]} | {row["params"]:,} | {row["share"]:.1%} | '
            f'{row["adamw_state_bytes"] / mib:.1f} MiB |'
        )
    full = rows[0] if rows else {}
    print('\n| method | params | peak grads | resident optimizer state | state elsewhere | on device | step time |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for row in rows:
        print(
            f'| {row["method"]} | {row["param_bytes"] / mib:.1f} MiB | {row["peak_grad_bytes"] / mib:.1f} MiB | '
            f'{row["peak_resident_optimizer_state_bytes"] / mib:.1f} MiB | '
            f'{row["optimizer_state_elsewhere_bytes"] / mib:.1f} MiB | '
            f'{row["training_state_on_device_bytes"] / full["training_state_on_device_bytes"]:.2f}x | '
            f'{row["median_step_seconds"] / full["median_step_seconds"]:.2f}x ({row["median_step_seconds"]:.3f} s) |'
        )
    if args.accuracy:
        print('\n| demo run | eval accuracy | peak optimizer state | batches | seconds |\n|---|---:|---:|---:|---:|')
        for name, row in result['accuracy'].items():
            print(
                f'| {name} | {row["eval_accuracy"]:.4f} | {row["peak_optimizer_state_bytes"] / mib:.1f} MiB | '
                f'{row["train_batches"]} | {row["seconds"]} |'
            )
    results_path = RESULTS if not args.skip_quick else RESULTS.with_name('hift_rotation_accuracy.json')
    results_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_path, json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
