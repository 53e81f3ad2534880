"""Shared fixtures for the LoRAInject tests: tiny models, a PEFT twin with the same adapter tensors."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from algorithms.lora_inject import apply_lora, load_adapter_state_dict
from algorithms.lora_inject.injection import adapter_layers
from algorithms.lora_inject.peft_format import PEFT_PREFIX, _our_name
from algorithms.parameter_selection import user_module

PEFT_FIELDS = (
    'r',
    'lora_alpha',
    'target_modules',
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
