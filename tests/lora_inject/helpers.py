"""Shared fixtures for the LoRAInject tests: tiny models, a PEFT twin with the same adapter tensors."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from composer_thaw.lora_inject import apply_lora, load_adapter_state_dict
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.lora_inject.peft_format import PEFT_PREFIX, _our_name
from composer_thaw.utils.parameter_selection import user_module

PEFT_FIELDS = (
    'r',
    'lora_alpha',
    'target_modules',
    'exclude_modules',
    'use_rslora',
    'use_dora',
    'bias',
    'modules_to_save',
    'rank_pattern',
    'alpha_pattern',
    'layers_to_transform',
    'layers_pattern',
)


def randomize_peft_adapters(peft_model: nn.Module, seed: int = 0) -> None:
    """Give every PEFT adapter tensor random values, so B != 0 and the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if 'lora_' in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + param)


def randomize_trainable(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter (adapters, modules_to_save, trained biases) by random noise, so all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def twin_models(hf_model: nn.Module, **lora: Any):
    """(ours, peft) built from two copies of ``hf_model`` with the same config; PEFT's random adapter tensors are
    copied into ours through PEFT's own ``get_peft_model_state_dict`` (which also exercises the key mapping)."""
    import peft
    from peft.utils import get_peft_model_state_dict

    ours_base, peft_base = copy.deepcopy(hf_model), copy.deepcopy(hf_model)
    peft_kwargs = {k: v for k, v in lora.items() if k in PEFT_FIELDS}
    peft_kwargs.setdefault('lora_dropout', 0.0)
    peft_model = peft.get_peft_model(peft_base, peft.LoraConfig(**peft_kwargs))
    randomize_peft_adapters(peft_model)
    apply_lora(ours_base, None, **lora)
    load_adapter_state_dict(ours_base, get_peft_model_state_dict(peft_model))
    return ours_base, peft_model


def peft_grads_in_our_names(ours: nn.Module, peft_model: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    renamed = get_peft_model_state_dict(peft_model, state_dict=grads)
    layers = adapter_layers(user_module(ours))
    return {_our_name(k[len(PEFT_PREFIX) :], layers): v for k, v in renamed.items()}


def our_grads(ours: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in user_module(ours).named_parameters() if p.grad is not None}


def tiny_hf_model(kind: str) -> nn.Module:
    """A tiny randomly initialized transformers model (seed 0, eval mode, vocabulary 100) of ``kind``: ``'bert'``,
    ``'distilbert'``, ``'roberta'`` (sequence classifiers, 3 labels), ``'t5'`` or ``'bart'`` (encoder-decoder LMs)."""
    import transformers as tf

    torch.manual_seed(0)
    size = dict(vocab_size=100, hidden_size=16, num_attention_heads=2, intermediate_size=32, num_labels=3)
    if kind == 'bert':
        return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=2, **size)).eval()
    if kind == 'roberta':
        config = tf.RobertaConfig(num_hidden_layers=2, max_position_embeddings=40, **size)
        return tf.RobertaForSequenceClassification(config).eval()
    if kind == 'distilbert':
        config = tf.DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32, num_labels=3)
        return tf.DistilBertForSequenceClassification(config).eval()
    if kind == 't5':
        config = tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
        return tf.T5ForConditionalGeneration(config).eval()
    if kind == 'bart':
        config = tf.BartConfig(
            vocab_size=100,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=40,
        )
        return tf.BartForConditionalGeneration(config).eval()
    raise ValueError(f'no tiny model {kind!r}')
