"""A model's size without its weights: a Hugging Face config and the head built on it (:class:`ModelSpec`), from a
built-in name (``llama-3-8b``, ``gpt2``, ...), a ``config.json`` or a built model, and the model built on the ``meta``
device from it (exact shapes, no memory). The memory estimate (:mod:`composer_thaw.recipes.memory_estimate`) counts
its bytes.

Example:
    >>> spec = load_model_config('llama-7b', {'num_hidden_layers': 8})
    >>> spec.task, spec.config.hidden_size
    ('causal-lm', 4096)
    >>> model = meta_model(spec)  # every tensor on the meta device
    >>> next(model.parameters()).device, f'{sum(p.numel() for p in model.parameters()):,}'
    (device(type='meta'), '...')
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from composer_thaw.core.validation import ConfigError
from composer_thaw.models.builtin import default_task, embedded_minilm_path
from composer_thaw.utils.parameter_selection import user_module

__all__ = ['BUILTIN_CONFIGS', 'ModelSpec', 'load_model_config', 'meta_model', 'spec_of']

# Hugging Face config dicts of well-known models, so sizes can be estimated without a download.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    'gpt2': {
        'model_type': 'gpt2',
        'n_embd': 768,
        'n_layer': 12,
        'n_head': 12,
        'vocab_size': 50257,
        'n_positions': 1024,
    },
    'llama-7b': {
        'model_type': 'llama',
        'hidden_size': 4096,
        'intermediate_size': 11008,
        'num_hidden_layers': 32,
        'num_attention_heads': 32,
        'num_key_value_heads': 32,
        'vocab_size': 32000,
        'max_position_embeddings': 4096,
    },
    'llama-3-8b': {  # Meta-Llama-3-8B's config.json
        'model_type': 'llama',
        'hidden_size': 4096,
        'intermediate_size': 14336,
        'num_hidden_layers': 32,
        'num_attention_heads': 32,
        'num_key_value_heads': 8,
        'vocab_size': 128256,
        'max_position_embeddings': 8192,
        'rope_theta': 500000.0,
        'tie_word_embeddings': False,
    },
    'llama-2-13b': {
        'model_type': 'llama',
        'hidden_size': 5120,
        'intermediate_size': 13824,
        'num_hidden_layers': 40,
        'num_attention_heads': 40,
        'num_key_value_heads': 40,
        'vocab_size': 32000,
        'max_position_embeddings': 4096,
    },
    'mistral-7b': {
        'model_type': 'mistral',
        'hidden_size': 4096,
        'intermediate_size': 14336,
        'num_hidden_layers': 32,
        'num_attention_heads': 32,
        'num_key_value_heads': 8,
        'vocab_size': 32000,
        'max_position_embeddings': 32768,
    },
}
BUILTIN_CONFIGS['llama-2-7b'] = BUILTIN_CONFIGS['llama-7b']  # Llama 2-7B has the same shape
# Also built in, from this package: 'minilm' (the embedded checkpoint's config, 6-class head) and 'tiny-decoder'.
_PACKAGE_MODELS = ('minilm', 'tiny-decoder')


@dataclass(frozen=True)
class ModelSpec:
    """A Hugging Face config and the head to build on it."""

    config: Any  # transformers.PretrainedConfig
    task: Literal['causal-lm', 'sequence-classification']
    name: str


def _tiny_decoder_config() -> dict[str, Any]:
    # The defaults of composer_thaw.models.builtin.tiny_decoder('llama'); the vocabulary is the embedded tokenizer's.
    return {
        'model_type': 'llama',
        'hidden_size': 64,
        'intermediate_size': 128,
        'num_hidden_layers': 4,
        'num_attention_heads': 4,
        'num_key_value_heads': 4,
        'vocab_size': 30522,
        'max_position_embeddings': 128,
        'pad_token_id': 0,
        'tie_word_embeddings': False,
    }


def load_model_config(
    source: Union[str, Path, Mapping[str, Any]], overrides: Optional[Mapping[str, Any]] = None, num_labels: int = 6
) -> ModelSpec:
    """A :class:`ModelSpec` from a built-in name, a ``config.json`` (or its folder), or a config dict.

    Args:
        source: ``'minilm'``, ``'tiny-decoder'``, one of :data:`BUILTIN_CONFIGS`, a path, or a dict with ``model_type``.
        overrides: config values to change (e.g. ``{'num_hidden_layers': 8}``).
        num_labels: classes of the head for encoder models (the built-in task has 6).

    Raises:
        ConfigError: an unknown name, a missing file, or a config Hugging Face cannot read.
    """
    from transformers import AutoConfig

    name = str(source) if not isinstance(source, Mapping) else source.get('_name_or_path', 'config')
    if isinstance(source, Mapping):
        data = dict(source)
    elif source == 'minilm':
        data = json.loads((embedded_minilm_path() / 'config.json').read_text())
    elif source == 'tiny-decoder':
        data = _tiny_decoder_config()
    elif source in BUILTIN_CONFIGS:
        data = dict(BUILTIN_CONFIGS[str(source)])
    else:
        path = Path(source)
        if path.is_dir():
            path = path / 'config.json'
        if not path.is_file():
            raise ConfigError(
                '--model-config',
                str(source),
                'expected a local config.json (or its folder) or one of '
                f'{", ".join(map(repr, (*_PACKAGE_MODELS, *BUILTIN_CONFIGS)))}.',
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError('--model-config', str(source), f'not valid JSON: {error}.') from error
    data.update(overrides or {})
    model_type = data.pop('model_type', None)
    if not model_type:
        raise ConfigError('--model-config', name, "the config has no 'model_type' (e.g. 'llama', 'bert').")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as error:
        raise ConfigError('--model-config', name, str(error)) from error
    encoder = default_task(config) == 'classification'
    if encoder:
        config.num_labels = num_labels
    return ModelSpec(config, 'sequence-classification' if encoder else 'causal-lm', name)


def spec_of(model: nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` of a built model (Composer-wrapped or not), to estimate exactly what it trains."""
    root = user_module(model)
    task: Literal['causal-lm', 'sequence-classification'] = (
        'sequence-classification' if 'SequenceClassification' in type(root).__name__ else 'causal-lm'
    )
    return ModelSpec(copy.deepcopy(root.config), task, type(root).__name__)


def meta_model(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``spec`` on the ``meta`` device: exact shapes, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if spec.task == 'causal-lm' else AutoModelForSequenceClassification
    with torch.device('meta'):
        model = cls.from_config(spec.config, torch_dtype=dtype)
    return model
