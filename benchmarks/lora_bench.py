"""LoRAInject benchmark: step time and training-state bytes next to PEFT and loralib; LoRA vs full fine-tuning.

1. Step time (forward, backward, AdamW step) and training-state bytes (parameters + gradients + optimizer state)
   of LoRA r=8 on ``q_proj``/``v_proj`` of the built-in LLaMA-style decoder, the same base and batch for all three
   implementations: ours (``apply_lora``), PEFT (``get_peft_model``) and loralib (``loralib.Linear`` swapped in,
   ``mark_only_lora_as_trainable``). Steps are interleaved across the three so machine load hits all alike; the
   median is reported. Ratios are to PEFT. The same for one adapted ``nn.Linear(1024, 1024)`` alone, where the
   adapter's own overhead is not hidden by the rest of the model (the decoder's step is dominated by its LM head).
2. Demo accuracy: all-MiniLM-L6-v2 on the built-in docstring classification task (6 classes), one epoch through
   Composer's Trainer, with ``LoRAInject(r=8, target_modules=['query', 'value'], modules_to_save=['classifier'])``
   and with full fine-tuning.

Run ``python -m benchmarks.lora_bench`` (under 2 minutes on one CPU thread). Prints a Markdown table and writes
``benchmarks/results/lora_inject.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import torch
from torch import nn

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import adamw, interleaved_times, train_step
from benchmarks.methods import swap_in_loralib
from composer_thaw.lora_inject import apply_lora
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.utils.atomic_files import atomic_write_text
from composer_thaw.utils.optimizer_surgery import training_state_bytes
from composer_thaw.utils.parameter_selection import user_module

RESULTS = Path(__file__).resolve().parent / 'results' / 'lora_inject.json'
TARGETS = ['q_proj', 'v_proj']


def build_base(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    composer_model = tiny_decoder(
        'llama', num_layers=args.layers, hidden_size=args.hidden, num_heads=4, max_seq_len=args.seq
    )
    return user_module(composer_model).to(args.device)


def ours(base: nn.Module, args: argparse.Namespace) -> nn.Module:
    model = copy.deepcopy(base)
    apply_lora(model, r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
    return model


def peft_model(base: nn.Module, args: argparse.Namespace) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(copy.deepcopy(base), config)


def loralib_model(base: nn.Module, args: argparse.Namespace) -> nn.Module:
    return swap_in_loralib(copy.deepcopy(base), TARGETS, r=args.r, lora_alpha=2 * args.r)


def lm_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    train_step(model, optimizer, ids, set_to_none=False)  # keep gradients allocated, so state bytes count them


def efficiency_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = build_base(args)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=generator).to(args.device)
    builders = {'composer-thaw LoRAInject': ours, 'PEFT 0.16 LoRA': peft_model, 'loralib 0.1.2': loralib_model}
    models = {name: build(base, args) for name, build in builders.items()}
    optimizers = {name: adamw(model) for name, model in models.items()}
    steps = {name: (lambda name=name: lm_step(models[name], optimizers[name], ids)) for name in models}
    times = interleaved_times(steps, args.rounds, args.device)  # warm-up step first: allocations, optimizer state
    rows = []
    for name, model in models.items():
        state = training_state_bytes(model, optimizers[name])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                'implementation': name,
                'trainable_params': trainable,
                'median_step_seconds': statistics.median(times[name]),
                'training_state_bytes': state.total,
                'param_bytes': state.params,
                'grad_bytes': state.grads,
                'optimizer_state_bytes': state.optimizer_state,
            }
        )
    reference = next(row for row in rows if row['implementation'].startswith('PEFT'))
    for row in rows:
        row['step_time_vs_peft'] = row['median_step_seconds'] / reference['median_step_seconds']
        row['state_bytes_vs_peft'] = row['training_state_bytes'] / reference['training_state_bytes']
    return rows


def layer_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One adapted nn.Linear(1024, 1024) on 2048 tokens: the adapter's own overhead, without the model around it."""
    import loralib
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 1024)).to(args.device)
    x = torch.randn(2048, 1024, device=args.device)
    ours_layer = copy.deepcopy(base)
    apply_lora(ours_layer, r=args.r, lora_alpha=2 * args.r, target_modules=['0'])
    peft_layer = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=['0'])
    )
    loralib_layer = nn.Sequential(loralib.Linear(1024, 1024, r=args.r, lora_alpha=2 * args.r)).to(args.device)
    loralib.mark_only_lora_as_trainable(loralib_layer)
    layers = {'composer-thaw LoRAInject': ours_layer, 'PEFT 0.16 LoRA': peft_layer, 'loralib 0.1.2': loralib_layer}
    optimizers = {name: adamw(layer) for name, layer in layers.items()}

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=False)
        layers[name](x).square().mean().backward()
        optimizers[name].step()

    times = interleaved_times({name: (lambda name=name: step(name)) for name in layers}, 3 * args.rounds, args.device)
    median = {name: statistics.median(values) for name, values in times.items()}
    return [
        {
            'implementation': name,
            'median_step_seconds': seconds,
            'step_time_vs_peft': seconds / median['PEFT 0.16 LoRA'],
        }
        for name, seconds in median.items()
    ]


def accuracy_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from composer import Trainer
    from composer.utils import reproducibility

    from composer_thaw.datasets.builtin import (
        STDLIB_DOCS_CLASSES,
        ClassificationDataset,
        build_dataloader,
        stdlib_docs_examples,
    )
    from composer_thaw.lora_inject import LoRAInject
    from composer_thaw.models.builtin import load_tokenizer, minilm_classifier

    tokenizer = load_tokenizer()
    train, evaluation = stdlib_docs_examples()
    train, evaluation = train[: args.train_examples], evaluation[: args.eval_examples]
    variants = {
        'LoRA r=8 (query, value) + classifier': (
            [LoRAInject(r=8, lora_alpha=16, target_modules=['query', 'value'], modules_to_save=['classifier'])],
            args.lora_lr,
        ),
        'full fine-tuning': ([], args.full_lr),
    }
    rows = []
    for name, (algorithms, lr) in variants.items():
        reproducibility.seed_all(0)
        model = minilm_classifier(num_labels=len(STDLIB_DOCS_CLASSES), dropout=0.0)
        train_loader = build_dataloader(
            ClassificationDataset(train, tokenizer, args.cls_seq), tokenizer, 16, True, True
        )
        eval_loader = build_dataloader(
            ClassificationDataset(evaluation, tokenizer, args.cls_seq), tokenizer, 32, False, False
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        trainer = Trainer(
            model=model,
            train_dataloader=train_loader,
            eval_dataloader=eval_loader,
            optimizers=optimizer,
            algorithms=algorithms,
            max_duration='1ep',
            eval_interval='1ep',
            device='cpu',
            progress_bar=False,
            log_to_console=False,
            seed=0,
        )
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        metrics = trainer.state.eval_metrics['eval']
        accuracy = float(next(iter(metrics.values())).compute())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                'variant': name,
                'lr': lr,
                'trainable_params': trainable,
                'eval_accuracy': accuracy,
                'fit_seconds': seconds,
            }
        )
    return rows


def markdown(
    config: dict[str, Any],
    efficiency: list[dict[str, Any]],
    layer: list[dict[str, Any]],
    accuracy: list[dict[str, Any]],
) -> str:
    mib = 2**20
    lines = [
        f'LLaMA-style decoder, hidden {config["hidden"]}, {config["layers"]} layers, batch {config["batch"]} x '
        f'{config["seq"]} tokens, LoRA r={config["r"]} on q_proj/v_proj, AdamW, device {config["device"]}, '
        f'{config["threads"]} CPU thread(s), torch {config["torch"]}.',
        '',
        f'| implementation | trainable params | step time (median of {config["rounds"]}) | vs PEFT | training state '
        '(params + grads + optimizer) | vs PEFT |',
        '|---|---|---|---|---|---|',
    ]
    for row in efficiency:
        lines.append(
            f'| {row["implementation"]} | {row["trainable_params"]:,} | {row["median_step_seconds"] * 1000:.1f} ms | '
            f'{row["step_time_vs_peft"]:.3f}x | {row["training_state_bytes"] / mib:.2f} MiB | '
            f'{row["state_bytes_vs_peft"]:.4f}x |'
        )
    lines += [
        '',
        f'One adapted nn.Linear(1024, 1024), 2048 tokens, r={config["r"]} (forward, backward, AdamW step; median of '
        f'{3 * config["rounds"]}):',
        '',
        '| implementation | step time | vs PEFT |',
        '|---|---|---|',
    ]
    for row in layer:
        lines.append(
            f'| {row["implementation"]} | {row["median_step_seconds"] * 1000:.2f} ms | '
            f'{row["step_time_vs_peft"]:.3f}x |'
        )
    if accuracy:
        lines += [
            '',
            f'all-MiniLM-L6-v2, docstring classification (6 classes), {config["train_examples"]} training examples, '
            f'1 epoch, {config["eval_examples"]} eval examples:',
            '',
            '| variant | lr | trainable params | eval accuracy | fit seconds |',
            '|---|---|---|---|---|',
        ]
        for row in accuracy:
            lines.append(
                f'| {row["variant"]} | {row["lr"]:g} | {row["trainable_params"]:,} | '
                f'{row["eval_accuracy"]:.1%} | {row["fit_seconds"]:.1f} |'
            )
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--r', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--train-examples', type=int, default=480)
    parser.add_argument('--eval-examples', type=int, default=256)
    parser.add_argument('--cls-seq', type=int, default=64)
    parser.add_argument('--lora-lr', type=float, default=2e-3)
    parser.add_argument('--full-lr', type=float, default=1e-4)
    parser.add_argument('--skip-accuracy', action='store_true')
    parser.add_argument('--output', type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    warnings.filterwarnings('ignore')
    config = {
        **{k: v for k, v in vars(args).items() if k != 'output'},
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
    }
    efficiency = efficiency_rows(args)
    layer = layer_rows(args)
    accuracy = [] if args.skip_accuracy else accuracy_rows(args)
    print(markdown(config, efficiency, layer, accuracy))
    result = {'config': config, 'efficiency': efficiency, 'single_layer': layer, 'accuracy': accuracy}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=1) + '\n')
    print(f'\nWrote {args.output}')
    return result


if __name__ == '__main__':
    main()
