"""Composer checkpoint bytes with and without ``checkpoint_trainable_only``, and a bit-exact resume from the small one.

Two models: the demo's (``yamls/demo.yaml``: all-MiniLM-L6-v2, 6-class head, RegexFreeze training the top layer, the
pooler and the head) and the 52M-parameter LLaMA-style decoder of :mod:`benchmarks.estimator_check` (hidden 512, 8
layers) with LoRAInject (r=8 on q_proj and v_proj) and RegexFreeze (lm_head). Each run trains one batch with AdamW
and saves a checkpoint (weights, optimizer state, algorithm state); the file sizes are compared with the same run
writing full checkpoints and with full fine-tuning. For LoRAInject on the 52M decoder, a run resumed from the
trainable-only checkpoint (on a freshly built model) must end bit-identical to an uninterrupted one.

Run ``python -m benchmarks.checkpoint_bytes`` (a few minutes on 2 CPU cores); results go to
``benchmarks/results/checkpoint_bytes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from composer import Trainer
from composer.utils import reproducibility
from torch.utils.data import DataLoader

from composer_thaw.lora_inject import LoRAInject
from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.parameter_selection import user_module

RESULTS = Path(__file__).resolve().parent / 'results'
DEMO_TRAINABLE = ['bert.encoder.layer.5', 'bert.pooler', 'classifier']  # yamls/demo.yaml


def _decoder_52m():
    from composer_thaw.models.builtin import tiny_decoder

    reproducibility.seed_all(0)
    return tiny_decoder('llama', num_layers=8, hidden_size=512, num_heads=8, max_seq_len=64)


def _demo_model():
    from composer_thaw.models.builtin import minilm_classifier

    reproducibility.seed_all(0)
    return minilm_classifier(num_labels=6)


def _batches(kind: str, count: int = 4, batch: int = 2, seq: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    samples = []
    for _ in range(count * batch):
        ids = torch.randint(1000, 30000, (seq,), generator=generator)
        label = ids.clone() if kind == 'lm' else torch.randint(0, 6, (), generator=generator)
        samples.append({'input_ids': ids, 'attention_mask': torch.ones(seq, dtype=torch.long), 'labels': label})
    return DataLoader(samples, batch_size=batch)  # type: ignore[arg-type]


def _fit(build: Callable[[], Any], kind: str, algorithms: list, folder: Path, duration: str = '1ba', **kw: Any):
    model = build()
    trainer = Trainer(
        model=model,
        train_dataloader=_batches(kind),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration=duration,
        algorithms=algorithms,
        device='cpu',
        precision='fp32',
        save_folder=str(folder),
        save_interval='1ba',
        save_overwrite=True,
        progress_bar=False,
        log_to_console=False,
        seed=17,
        **kw,
    )
    trainer.fit()
    trainer.close()
    return model


def _bytes(folder: Path) -> int:
    return (folder / 'ep0-ba1-rank0.pt').stat().st_size


def measure(work: Path) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    models = (
        (
            'demo (MiniLM, 6 classes)',
            _demo_model,
            'cls',
            [('regex_freeze', RegexFreeze, dict(trainable=DEMO_TRAINABLE))],
        ),
        (
            '52M decoder (hidden 512, 8 layers)',
            _decoder_52m,
            'lm',
            [
                ('lora_inject', LoRAInject, dict(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])),
                ('regex_freeze', RegexFreeze, dict(trainable=['lm_head'])),
            ],
        ),
    )
    for title, build, kind, algorithms in models:
        params = sum(p.numel() for p in build().parameters())
        full_ft = work / f'{kind}-full'
        _fit(build, kind, [], full_ft)
        for name, cls, options in algorithms:
            full, small = work / f'{kind}-{name}-full', work / f'{kind}-{name}-small'
            _fit(build, kind, [cls(**options, checkpoint_trainable_only=False)], full)
            _fit(build, kind, [cls(**options, checkpoint_trainable_only=True)], small)
            case = dict(
                model=title,
                params=params,
                algorithm=f'{name}({", ".join(f"{k}={v!r}" for k, v in options.items())})',
                full_finetune_bytes=_bytes(full_ft),
                full_bytes=_bytes(full),
                trainable_only_bytes=_bytes(small),
            )
            case['ratio_to_full'] = case['trainable_only_bytes'] / case['full_bytes']
            case['ratio_to_full_finetune'] = case['trainable_only_bytes'] / case['full_finetune_bytes']
            cases.append(case)
            print(json.dumps(case), flush=True)
    return {'cases': cases, 'resume': resume_check(work)}


def resume_check(work: Path) -> dict[str, Any]:
    """LoRAInject on the 52M decoder: 2 batches uninterrupted vs 1 + resume from the trainable-only checkpoint."""
    options = dict(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])
    folder = work / 'resume'
    uninterrupted = _fit(_decoder_52m, 'lm', [LoRAInject(**options)], folder, duration='2ba')
    resumed = _fit(
        _decoder_52m,
        'lm',
        [LoRAInject(**options)],
        work / 'resumed',
        duration='2ba',
        load_path=str(folder / 'ep0-ba1-rank0.pt'),
    )
    expected = dict(user_module(uninterrupted).named_parameters())
    different = [n for n, p in user_module(resumed).named_parameters() if not torch.equal(p, expected[n])]
    return {
        'model': '52M decoder',
        'algorithm': f'lora_inject({options})',
        'bit_identical': not different,
        'different': different[:5],
    }


def markdown(results: dict[str, Any]) -> str:
    mib = lambda b: f'{b / 2**20:.1f} MiB'  # noqa: E731
    lines = [
        'Composer checkpoint bytes after one AdamW step (weights, optimizer state, algorithm state), CPU, fp32:',
        '',
        '| model | algorithm | full fine-tuning | algorithm, full checkpoint | trainable-only | of full | of full FT |',
        '|---|---|---|---|---|---|---|',
    ]
    for c in results['cases']:
        lines.append(
            f'| {c["model"]} | `{c["algorithm"]}` | {mib(c["full_finetune_bytes"])} | {mib(c["full_bytes"])} | '
            f'{mib(c["trainable_only_bytes"])} | {100 * c["ratio_to_full"]:.2f}% | '
            f'{100 * c["ratio_to_full_finetune"]:.2f}% |'
        )
    r = results['resume']
    lines += [
        '',
        f'Resume of `{r["algorithm"]}` on the {r["model"]} from the trainable-only checkpoint: '
        f'{"bit-identical" if r["bit_identical"] else "DIFFERENT: " + ", ".join(r["different"])}.',
        '',
    ]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results = measure(Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'checkpoint_bytes.json').write_text(json.dumps(results, indent=1) + '\n')
    text = markdown(results)
    (args.out / 'checkpoint_bytes.md').write_text(text)
    print(text)
    return results


if __name__ == '__main__':
    main()
