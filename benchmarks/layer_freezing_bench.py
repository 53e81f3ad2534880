"""LayerFreezing benchmark: optimizer memory freed, and step time with half the blocks frozen.

Two measurements on the built-in LLaMA-style decoder (hidden 256, 8 layers, sequence 128, AdamW):

1. Optimizer-state bytes before and after freezing half of the freezable units, for Composer's
   ``LayerFreezing`` functional form and ours (leaf and block granularity), after one step before
   and one step after freezing. Ours frees the frozen share; Composer's keeps it.
2. Training step time (forward, backward, AdamW step) with the embeddings and 4 of 8 blocks frozen,
   against full fine-tuning, next to the ideal ratio: the forward of the frozen prefix under
   ``no_grad`` plus a full step of the unfrozen part alone, each measured.

Run ``python -m benchmarks.layer_freezing_bench`` (about a minute on one CPU thread). Prints a
Markdown table and writes ``benchmarks/results/layer_freezing.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from torch import nn

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import adamw, interleaved_times, train_step
from composer_thaw.layer_freezing import freezable_units, freeze_layers, freeze_units
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.utils.atomic_files import atomic_write_text
from composer_thaw.utils.optimizer_surgery import optimizer_state_bytes
from composer_thaw.utils.parameter_selection import user_module

RESULTS = Path(__file__).resolve().parent / 'results' / 'layer_freezing.json'


def build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    composer_model = tiny_decoder(
        'llama', num_layers=args.layers, hidden_size=args.hidden, num_heads=4, max_seq_len=args.seq
    )
    return user_module(composer_model)  # the Hugging Face LlamaForCausalLM


def make_batch(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1000, 30000, (args.batch, args.seq), generator=generator)


def frozen_share(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters() if not p.requires_grad) / sum(
        p.numel() for p in model.parameters()
    )


def memory_rows(args: argparse.Namespace, ids: torch.Tensor) -> list[dict[str, Any]]:
    """Optimizer-state bytes when half the freezable units are frozen (schedule fraction 0.5)."""
    from composer.algorithms.layer_freezing import freeze_layers as composer_freeze_layers

    # Default arguments (freeze_start=0.5, freeze_level=1.0) at 75% of training: the schedule says 0.5.
    variants: dict[str, tuple[str, Callable[[nn.Module, torch.optim.Optimizer], tuple[int, float]]]] = {
        'Composer LayerFreezing': ('leaf', lambda m, o: composer_freeze_layers(m, o, 0.75)),
        "ours, granularity='leaf'": ('leaf', lambda m, o: freeze_layers(m, o, 0.75, granularity='leaf')),
        "ours, granularity='block'": ('block', lambda m, o: freeze_layers(m, o, 0.75, granularity='block')),
    }
    rows = []
    for name, (granularity, freeze) in variants.items():
        model = build_model(args)
        units = len(freezable_units(model, granularity))  # Composer's leaf count is the same on this model
        optimizer = adamw(model)
        train_step(model, optimizer, ids)
        before = optimizer_state_bytes(optimizer)
        depth, _ = freeze(model, optimizer)
        train_step(model, optimizer, ids)
        after = optimizer_state_bytes(optimizer)
        rows.append(
            {
                'variant': name,
                'units_frozen': f'{depth} of {units} {granularity} units',
                'frozen_param_share': frozen_share(model),
                'optimizer_state_bytes_before': before,
                'optimizer_state_bytes_after': after,
                'optimizer_state_freed_share': 1 - after / before,
            }
        )
        del model, optimizer
    return rows


def step_time_rows(args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    """Median step times: full fine-tuning, half the blocks frozen, and the pieces of the ideal."""
    full = build_model(args)
    full_optimizer = adamw(full)

    frozen = build_model(args)
    units = freezable_units(frozen, 'block')  # embeddings, then the blocks
    frozen_units = units[: 1 + args.layers // 2]
    frozen_optimizer = adamw(frozen)
    freeze_units(frozen, frozen_optimizer, frozen_units)

    # The unfrozen part alone: the same model with only its last blocks (embedding lookup kept, frozen; it is free).
    rest = copy.deepcopy(frozen)
    rest.model.layers = nn.ModuleList(list(rest.model.layers)[args.layers // 2 :])
    rest_optimizer = adamw(rest)
    assert sum(p.numel() for p in rest.parameters() if p.requires_grad) == sum(
        p.numel() for p in frozen.parameters() if p.requires_grad
    )

    def forward_no_grad(model: nn.Module) -> None:
        with torch.no_grad():
            model(input_ids=ids, labels=ids, use_cache=False)

    measurements: dict[str, Callable[[], Any]] = {
        'full_step': lambda: train_step(full, full_optimizer, ids),
        'frozen_step': lambda: train_step(frozen, frozen_optimizer, ids),
        'forward_no_grad_all': lambda: forward_no_grad(frozen),
        'forward_no_grad_unfrozen_part': lambda: forward_no_grad(rest),
        'unfrozen_part_step': lambda: train_step(rest, rest_optimizer, ids),
    }
    # Warm-up (allocations, optimizer state), then interleaved, so load from other processes hits all alike.
    times = interleaved_times(measurements, args.rounds)
    median = {key: statistics.median(values) for key, values in times.items()}
    ideal = median['forward_no_grad_all'] - median['forward_no_grad_unfrozen_part'] + median['unfrozen_part_step']
    return {
        'frozen_units': [unit.name for unit in frozen_units],
        'frozen_param_share': frozen_share(frozen),
        'median_seconds': median,
        'ideal_frozen_step_seconds': ideal,
        'frozen_over_full': median['frozen_step'] / median['full_step'],
        'ideal_over_full': ideal / median['full_step'],
        'rounds': args.rounds,
    }


def markdown(config: dict[str, Any], memory: list[dict[str, Any]], speed: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f'LLaMA-style decoder, hidden {config["hidden"]}, {config["layers"]} layers, batch {config["batch"]} x '
        f'{config["seq"]} tokens, AdamW, {config["threads"]} CPU thread(s), torch {config["torch"]}.',
        '',
        '| default schedule at 75% of training | units frozen | frozen share of params | optimizer state before '
        '| after | freed |',
        '|---|---|---|---|---|---|',
    ]
    for row in memory:
        lines.append(
            f'| {row["variant"]} | {row["units_frozen"]} | {row["frozen_param_share"]:.1%} | '
            f'{row["optimizer_state_bytes_before"] / mib:.1f} MiB | '
            f'{row["optimizer_state_bytes_after"] / mib:.1f} MiB | '
            f'{row["optimizer_state_freed_share"]:.1%} |'
        )
    median = speed['median_seconds']
    lines += [
        '',
        f'| step time (median of {speed["rounds"]}) | seconds | ratio to full |',
        '|---|---|---|',
        f'| full fine-tuning | {median["full_step"]:.3f} | 1.00 |',
        f'| embeddings + {config["layers"] // 2} of {config["layers"]} blocks frozen '
        f'({speed["frozen_param_share"]:.0%} of params) | {median["frozen_step"]:.3f} | '
        f'{speed["frozen_over_full"]:.2f} |',
        '| ideal: no-grad forward of the frozen prefix + step of the rest | '
        f'{speed["ideal_frozen_step_seconds"]:.3f} | '
        f'{speed["ideal_over_full"]:.2f} |',
    ]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--layers', type=int, default=8)
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--output', type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    config = {
        **{k: v for k, v in vars(args).items() if k != 'output'},
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
    }
    ids = make_batch(args)
    memory = memory_rows(args, ids)
    speed = step_time_rows(args, ids)
    print(markdown(config, memory, speed))
    result = {'config': config, 'optimizer_state': memory, 'step_time': speed}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=1) + '\n')
    print(f'\nWrote {args.output}')
    return result


if __name__ == '__main__':
    main()
