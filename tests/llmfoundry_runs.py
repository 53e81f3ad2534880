"""llm-foundry end to end, run by tests/test_llmfoundry.py in one subprocess: ``python tests/llmfoundry_runs.py OUT``.

Builds a tiny LLaMA-style decoder saved with ``save_pretrained`` (with its tokenizer) and a local JSONL of
prompt/response pairs (from Python's own help topics), then trains each example YAML of ``yamls/llmfoundry/``
through llm-foundry's ``train_from_yaml`` (what ``llmfoundry train`` calls), in this one process: 2 batches with a
checkpoint after each, then a run resumed from the first checkpoint. Writes ``OUT/results.json``: per algorithm the
parameters that changed, whether the resumed run ended bit-identical, the checkpoint's tensors, and timings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import torch

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ('lora_inject', 'regex_freeze', 'layer_freezing', 'hift_rotation')


def make_assets(out: Path) -> tuple[Path, Path]:
    """A tiny causal LM folder and a JSONL of prompt/response pairs."""
    import pydoc_data.topics

    from composer.utils import reproducibility

    from composer_thaw.models.builtin import load_tokenizer, tiny_decoder

    reproducibility.seed_all(0)
    model_dir, data = out / 'model', out / 'train.jsonl'
    tiny_decoder('llama', num_layers=2, hidden_size=32, num_heads=4, max_seq_len=64).model.save_pretrained(model_dir)
    tokenizer = load_tokenizer()
    tokenizer.eos_token = '[SEP]'  # llm-foundry's fine-tuning data needs an EOS token; MiniLM's has none
    tokenizer.save_pretrained(model_dir)
    topics = sorted(pydoc_data.topics.topics.items())[:64]
    data.write_text(''.join(json.dumps({'prompt': f'{k}: ', 'response': v[:160]}) + '\n' for k, v in topics))
    return model_dir, data


def overrides(algorithm: str, model_dir: Path, data: Path, run: Path, **extra: str) -> list[str]:
    options = {
        'variables.model': str(model_dir),
        'variables.data': str(data),
        'max_seq_len': '64',
        'max_duration': '2ba',
        'global_train_batch_size': '4',
        'device_train_microbatch_size': '4',
        'optimizer.lr': '1.0e-3',
        'scheduler.t_warmup': '0ba',
        'save_folder': str(run / 'checkpoints'),
        'save_interval': '1ba',
        'log_to_console': 'false',
        **extra,
    }
    if algorithm == 'layer_freezing':  # at every batch, not only at epoch ends; one of 3 blocks frozen after batch 1
        options.update({'algorithms.layer_freezing.interval': '1', 'algorithms.layer_freezing.freeze_level': '1.0'})
    if algorithm == 'lora_inject':
        options['callbacks.merged_hf_checkpointer.save_folder'] = str(run / 'hf')
        options['callbacks.merged_hf_checkpointer.save_interval'] = '2ba'
    return [f'{key}={value}' for key, value in options.items()]


def parameters(trainer: Any) -> dict[str, torch.Tensor]:
    from composer_thaw.utils.parameter_selection import user_module

    return {n: p.detach().clone() for n, p in user_module(trainer.state.model).named_parameters()}


def run_algorithm(algorithm: str, model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    from llmfoundry.command_utils import train_from_yaml

    yaml = str(REPO / 'yamls' / 'llmfoundry' / f'{algorithm}.yaml')
    started = time.perf_counter()
    first = train_from_yaml(yaml, overrides(algorithm, model_dir, data, out / algorithm))
    initial = dict(type(first.state.model.model).from_pretrained(model_dir).named_parameters())
    uninterrupted = parameters(first)
    checkpoint = out / algorithm / 'checkpoints' / 'ep0-ba1-rank0.pt'
    first.close()
    resumed_trainer = train_from_yaml(
        yaml,
        overrides(algorithm, model_dir, data, out / f'{algorithm}-resumed', load_path=str(checkpoint)),
    )
    resumed = parameters(resumed_trainer)
    resumed_trainer.close()
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state']
    base_names = {n.replace('.base_layer.', '.') for n in uninterrupted}
    result = {
        'seconds': time.perf_counter() - started,
        'changed': sorted(
            n
            for n, p in uninterrupted.items()
            if n.replace('.base_layer.', '.') not in initial
            or not torch.equal(p, initial[n.replace('.base_layer.', '.')])
        ),
        'new': sorted(n for n in uninterrupted if n.replace('.base_layer.', '.') not in initial),
        'unmatched_initial': sorted(set(initial) - base_names),
        'resume_different': sorted(n for n, p in resumed.items() if not torch.equal(p, uninterrupted[n])),
        'checkpoint_tensors': sorted(k for k, v in state['model'].items() if isinstance(v, torch.Tensor)),
        'checkpoint_algorithms': [name for name, _ in state.get('algorithms', [])],
        'optimizer_state_tensors': len(next(iter(state['optimizers'].values()))['state']),
    }
    hf = out / algorithm / 'hf' / 'huggingface'
    if hf.exists():
        from safetensors.torch import load_file

        folders = sorted(hf.iterdir())
        result['hf_export'] = sorted(load_file(str(folders[-1] / 'model.safetensors')))
    return result


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir, data = make_assets(out)
    results: dict[str, Any] = {'assets_seconds': time.perf_counter() - started}
    only = sys.argv[2:] or ALGORITHMS
    for algorithm in only:
        try:
            results[algorithm] = run_algorithm(algorithm, model_dir, data, out)
        except Exception as error:  # reported per algorithm by the test
            import traceback

            results[algorithm] = {'error': f'{type(error).__name__}: {error}', 'traceback': traceback.format_exc()}
    results['total_seconds'] = time.perf_counter() - started
    (out / 'results.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
