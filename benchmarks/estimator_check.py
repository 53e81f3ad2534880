"""Check ``thaw estimate`` against an independent measurement: the process's resident memory growth on CPU.

On a decoder large enough that allocator noise is small next to it (``--hidden 768 --layers 12``: 118M parameters),
for each algorithm: build the model, take the resident set size (RSS), run one forward and backward (gradients
appear), take RSS again, run the first optimizer step (optimizer state appears), take RSS again. Activations are
freed in between; with glibc's mmap threshold pinned and ``malloc_trim`` (see :mod:`benchmarks.measure`) their pages
go back to the system, so the two RSS differences are the gradients and the optimizer state. The estimator never
sees the model: it builds its own copy on the ``meta`` device from the config.

Run ``python -m benchmarks.estimator_check`` (about 20 s on one CPU thread); the benchmark runner records it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import quiet_allocator, rss_bytes, trim
from composer_thaw.recipes.memory_estimate import estimate_training_state, spec_of
from composer_thaw.utils.atomic_files import atomic_write_text

TOLERANCE = 0.03  # relative, on gradients + optimizer state
ABSOLUTE_SLACK = 4 * 2**20  # bytes: allocator bookkeeping, autograd's small buffers

# Algorithms checked, with options valid on any built-in decoder size.
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ('full', {}),
    ('regex_freeze', {'trainable': ['lm_head', r'model\.layers\.\d*[02468]\.mlp'], 'syntax': 'regex'}),
    ('layer_freezing', {'freeze_start': 0.0, 'freeze_level': 0.5, 'granularity': 'block'}),
    # bf16 weights, fp32 masters and optimizer state for what trains; "optimizer state" here includes the masters
    (
        'regex_freeze',
        {'trainable': ['lm_head', r'model\.layers\.\d*[02468]\.mlp'], 'syntax': 'regex', 'master_weights': 'fp32'},
    ),
    ('layer_freezing', {'freeze_start': 0.0, 'freeze_level': 0.5, 'granularity': 'block', 'master_weights': 'fp32'}),
)


@dataclass
class RssCheck:
    algorithm: str
    options: dict[str, Any]
    params: int
    predicted_grad_bytes: int
    predicted_state_bytes: int
    rss_grad_bytes: int
    rss_state_bytes: int

    @property
    def predicted(self) -> int:
        return self.predicted_grad_bytes + self.predicted_state_bytes

    @property
    def measured(self) -> int:
        return self.rss_grad_bytes + self.rss_state_bytes

    @property
    def relative_error(self) -> float:
        return (self.measured - self.predicted) / self.predicted

    @property
    def within_tolerance(self) -> bool:
        return abs(self.measured - self.predicted) <= TOLERANCE * self.predicted + ABSOLUTE_SLACK


def build_decoder(hidden: int, layers: int, seed: int = 0):
    from composer_thaw.models.builtin import tiny_decoder
    from composer_thaw.utils.parameter_selection import user_module

    torch.manual_seed(seed)
    return user_module(
        tiny_decoder('llama', num_layers=layers, hidden_size=hidden, num_heads=max(1, hidden // 64), max_seq_len=64)
    )


def _apply(model, optimizer, algorithm: str, options: dict[str, Any]) -> None:
    if algorithm == 'regex_freeze':
        from composer_thaw.regex_freeze import apply_regex_freeze

        apply_regex_freeze(model, optimizer, **options)
    elif algorithm == 'layer_freezing':
        from composer_thaw.layer_freezing import freeze_layers

        freeze_layers(model, optimizer, 1.0, options['freeze_start'], options['freeze_level'], options['granularity'])


def measure_case(algorithm: str, options: dict[str, Any], hidden: int, layers: int) -> RssCheck:
    """RSS growth of gradients and of the first optimizer step, next to the estimator's prediction.

    With ``master_weights`` the model is bf16 and the masters' growth (when they are made) counts with the optimizer
    state; the gradients are held through the step, which would otherwise release them.
    """
    from composer_thaw.utils.master_weights import enable_master_weights

    mode = options.get('master_weights')
    model = build_decoder(hidden, layers)
    if mode is not None:
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    _apply(model, optimizer, algorithm, {k: v for k, v in options.items() if k != 'master_weights'})
    ids = torch.randint(1000, 30000, (1, 16), generator=torch.Generator().manual_seed(1))
    trim()
    before_masters = rss_bytes()
    enable_master_weights(model, optimizer, mode)
    trim()
    before = rss_bytes()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    trim()
    with_grads = rss_bytes()
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # held through the step
    optimizer.step()
    trim()
    with_state = rss_bytes()
    del grads
    estimate = estimate_training_state(spec_of(model), algorithm, options, dtype=next(model.parameters()).dtype)
    check = RssCheck(
        algorithm,
        options,
        estimate.total_params,
        estimate.grad_bytes,
        estimate.optimizer_state_bytes + estimate.master_bytes,
        with_grads - before,
        with_state - with_grads + before - before_masters,
    )
    del model, optimizer
    trim()
    return check


def run_checks(hidden: int = 768, layers: int = 12, cases=CASES) -> list[RssCheck]:
    quiet_allocator()
    torch.set_num_threads(1)
    warm = build_decoder(32, 1)  # autograd and the optimizer's one-time allocations happen here, not in a case
    train_ids = torch.randint(1000, 30000, (1, 8))
    warm(input_ids=train_ids, labels=train_ids, use_cache=False).loss.backward()
    torch.optim.AdamW(warm.parameters()).step()
    del warm
    return [measure_case(algorithm, dict(options), hidden, layers) for algorithm, options in cases]


def markdown(checks: list[RssCheck], hidden: int, layers: int) -> str:
    mib = 2**20
    lines = [
        f'Estimator vs process RSS growth (CPU), LLaMA-style decoder hidden {hidden}, {layers} layers '
        f'({checks[0].params / 1e6:.0f}M parameters), AdamW; tolerance {TOLERANCE:.0%} + {ABSOLUTE_SLACK // mib} MiB:',
        '',
        '| algorithm | predicted grads | RSS growth, backward | predicted optimizer state | RSS growth, first step '
        '| error | within tolerance |',
        '|---|---|---|---|---|---|---|',
    ]
    for c in checks:
        options = ', '.join(f'{k}={v!r}' for k, v in c.options.items())
        lines.append(
            f'| {c.algorithm}{f"({options})" if options else ""} | {c.predicted_grad_bytes / mib:.1f} MiB | '
            f'{c.rss_grad_bytes / mib:.1f} MiB | {c.predicted_state_bytes / mib:.1f} MiB | '
            f'{c.rss_state_bytes / mib:.1f} MiB | {c.relative_error:+.2%} | '
            f'{"yes" if c.within_tolerance else "NO"} |'
        )
    return '\n'.join(lines)


def as_json(checks: list[RssCheck]) -> list[dict[str, Any]]:
    return [
        {
            **asdict(c),
            'relative_error': c.relative_error,
            'within_tolerance': c.within_tolerance,
            'tolerance': TOLERANCE,
            'absolute_slack_bytes': ABSOLUTE_SLACK,
        }
        for c in checks
    ]


def main(argv: Optional[list[str]] = None) -> list[RssCheck]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--hidden', type=int, default=768)
    parser.add_argument('--layers', type=int, default=12)
    parser.add_argument('--output', type=Path, default=None, help='write the checks as JSON here')
    args = parser.parse_args(argv)
    checks = run_checks(args.hidden, args.layers)
    print(markdown(checks, args.hidden, args.layers))
    if args.output:
        atomic_write_text(args.output, json.dumps(as_json(checks), indent=1) + '\n')
    return checks


if __name__ == '__main__':
    main()
