"""LoRA as model surgery, without a Trainer: :func:`apply_lora` injects adapters and freezes the rest,
:func:`freeze_outside_adapters` re-freezes after other surgery, :func:`merge_adapters` folds them in.

The algorithm (:class:`~composer_thaw.lora_inject.lora_inject.LoRAInject`) and the PEFT format
(:mod:`~composer_thaw.lora_inject.peft_format`) build on this module; it imports neither.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=2)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # moved onto the adapters
    >>> summary = apply_lora(model, optimizer, r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])
    >>> summary.adapted
    ('model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.q_proj',
     'model.layers.1.self_attn.v_proj')
    >>> summary.trainable_params, f'{summary.trainable_fraction:.2%}'
    (4096, '0.10%')
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from composer_thaw.core.types import Optimizers, single_optimizer
from composer_thaw.lora_inject.config import OPTIONS, TASK_MODULES_TO_SAVE, LoRAConfig
from composer_thaw.lora_inject.injection import (
    adapter_layers,
    check_not_peft,
    inject,
    plan_injection,
    saved_module_names,
)
from composer_thaw.utils.adapters import adapter_config_of, record_adapter_config
from composer_thaw.utils.master_weights import LOW_PRECISION_DTYPES
from composer_thaw.utils.optimizer_surgery import add_params, group_index_of, remove_params
from composer_thaw.utils.parameter_selection import user_module

log = logging.getLogger(__name__)

__all__ = [
    'LoRASummary',
    'adapters_in_base_dtype',
    'apply_lora',
    'freeze_outside_adapters',
    'frozen_base_parameters',
    'inject_adapters',
    'lora_config_of',
    'merge_adapters',
    'trainable_parameter_names',
    'unmerge_adapters',
]


@dataclass(frozen=True)
class LoRASummary:
    """What :func:`apply_lora` did."""

    adapted: tuple[str, ...]  # names of the adapted modules
    trainable_params: int  # elements that train: adapters, modules_to_save, trainable biases
    total_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


def lora_config_of(model: nn.Module) -> Optional[LoRAConfig]:
    """The configuration the model's adapters were injected with, or ``None``."""
    config = adapter_config_of(model)
    return config if isinstance(config, LoRAConfig) else None


def trainable_parameter_names(root: nn.Module, config: LoRAConfig) -> list[str]:
    """Names (in ``root``) of the parameters that train under ``config``, once adapters are injected."""
    layers = adapter_layers(root)
    saved = tuple(f'{name}.' for name in saved_module_names(root, config))
    lora_biases = {f'{name}.base_layer.bias' for name in layers}
    names = []
    for name, _ in root.named_parameters():
        owner, _, leaf = name.rpartition('.')
        if owner in layers and leaf in layers[owner].adapter_parameters():
            names.append(name)
        elif name.startswith(saved):
            names.append(name)
        elif config.bias == 'all' and leaf == 'bias':
            names.append(name)
        elif config.bias == 'lora_only' and name in lora_biases:
            names.append(name)
    return names


def apply_lora(
    model: nn.Module,
    optimizers: Optional[Optimizers] = None,
    config: Optional[LoRAConfig] = None,
    **config_kwargs: Any,
) -> LoRASummary:
    """Inject low-rank adapters into ``model``, freeze the rest, and move the optimizer onto the adapters.

    Everything is checked before the first module is replaced: on error, model and optimizer are unchanged.
    Afterwards each adapter parameter sits in the param group of the base weight it adapts (so weight-decay groups
    and schedulers keep working); the frozen base parameters are out of the optimizer and hold no optimizer state.
    Applying the same configuration again changes nothing.

    Args:
        model: a Hugging Face model, a Composer ``HuggingFaceModel``, or any ``nn.Module`` (DDP-wrapped or not). Module
            names in the configuration are relative to the user's model (``user_module(model)``).
        optimizers: the optimizer (at most one) to update; ``None`` when there is none yet.
        config: a :class:`LoRAConfig`; or pass its fields as keyword arguments (not both).

    Returns:
        A :class:`LoRASummary`.

    Raises:
        ValueError: on an invalid configuration, a target that matches nothing or has an unsupported type, a model
            already adapted with another configuration, or a PEFT model.
        ConfigTypeError: (a ``TypeError`` and a ``ValueError``) for a field given both in ``config`` and as a keyword.
    """
    config = OPTIONS.build(config, config_kwargs)
    summary = inject_adapters(model, optimizers, config)
    freeze_outside_adapters(model, optimizers)
    return summary


def inject_adapters(model: nn.Module, optimizers: Optional[Optimizers], config: LoRAConfig) -> LoRASummary:
    """:func:`apply_lora` but for taking the frozen parameters out of the optimizer: they stay there, with
    ``requires_grad=False``, until :func:`freeze_outside_adapters` (so surgery that runs in between, such as
    Composer's Factorize, finds the parameters it replaces in the optimizer)."""
    root = user_module(model)
    check_not_peft(model, root)
    optimizer = single_optimizer(optimizers)
    existing = adapter_config_of(root)
    if existing is not None and existing != config:
        raise ValueError(
            f'The model already has LoRA adapters with another configuration ({existing}); requested {config}. '
            'Apply LoRA once per model.',
        )
    plan = plan_injection(root, config)

    # ---- from here on nothing can fail on user input ----
    groups = group_index_of(optimizer) if optimizer is not None else {}
    group_of_target = {}
    for target in plan.targets:
        base = root.get_submodule(target.name)
        owned = [id(p) for p in base.parameters()]
        group_of_target[target.name] = next((groups[i] for i in owned if i in groups), 0)
    created = inject(root, plan, config)
    record_adapter_config(root, config)

    trainable = set(trainable_parameter_names(root, config))
    named = dict(root.named_parameters())
    frozen = [p for name, p in named.items() if name not in trainable]
    for param in frozen:
        param.requires_grad_(False)
    for name in trainable:
        named[name].requires_grad_(True)
    if optimizer is not None:
        present = set(group_index_of(optimizer))
        additions: dict[int, list[torch.Tensor]] = {}
        for layer_name, layer in created.items():
            new_params = list(layer.adapter_parameters().values())
            additions.setdefault(group_of_target[layer_name], []).extend(new_params)
            present |= {id(p) for p in new_params}
        for name in sorted(trainable):  # e.g. modules_to_save the user had left out of the optimizer
            if id(named[name]) not in present:
                additions.setdefault(0, []).append(named[name])
        if additions and optimizer.param_groups:
            order = {id(p): index for index, p in enumerate(root.parameters())}
            add_params(optimizer, additions, order)

    enable_input_require_grads = getattr(root, 'enable_input_require_grads', None)
    # Transformers 5 names it is_activation_checkpointing (is_gradient_checkpointing warns, deprecated).
    checkpointing = getattr(root, 'is_activation_checkpointing', None)
    if checkpointing is None:
        checkpointing = getattr(root, 'is_gradient_checkpointing', False)
    if checkpointing and enable_input_require_grads is not None:
        # Re-entrant checkpointing only back-propagates into blocks whose inputs require grad; the embeddings are
        # frozen.
        enable_input_require_grads()

    layers = adapter_layers(root)
    trainable_numel = sum(p.numel() for p in root.parameters() if p.requires_grad)
    total_numel = sum(p.numel() for p in root.parameters())
    log.info('LoRA: adapted %d modules; %d of %d parameters train.', len(layers), trainable_numel, total_numel)
    _warn_if_task_head_frozen(root)
    return LoRASummary(tuple(layers), trainable_numel, total_numel)


# Hugging Face task models whose head is new when fine-tuning starts -> PEFT's task type, whose heads
# (TASK_MODULES_TO_SAVE) PEFT adds to modules_to_save.
_TASK_OF_MODEL = {
    'ForSequenceClassification': 'SEQ_CLS',
    'ForTokenClassification': 'TOKEN_CLS',
    'ForQuestionAnswering': 'QUESTION_ANS',
}


def _warn_if_task_head_frozen(root: nn.Module) -> None:
    """Warn when a task model's head (usually freshly initialized) keeps its own weights frozen: only the adapters
    around it would learn, on top of random weights."""
    task = next((task for suffix, task in _TASK_OF_MODEL.items() if type(root).__name__.endswith(suffix)), '')
    heads = TASK_MODULES_TO_SAVE.get(task, ())
    for name in heads:
        head = getattr(root, name, None)
        weights = [p for n, p in head.named_parameters() if 'lora_' not in n] if isinstance(head, nn.Module) else []
        if weights and not any(p.requires_grad for p in weights):
            warnings.warn(
                f'LoRAInject: the head {name!r} of {type(root).__name__} stays frozen; a task head is usually newly '
                f'initialized, so its random weights would never train. Add it to modules_to_save '
                f"(modules_to_save=['{name}']), or set task_type={task!r} as in PEFT.",
                UserWarning,
                stacklevel=3,
            )


def frozen_base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the model's LoRA configuration keeps frozen: all but the adapters, ``modules_to_save`` and
    trained biases (none before :func:`apply_lora`)."""
    root = user_module(model)
    config = lora_config_of(root)
    trainable = set(trainable_parameter_names(root, config)) if config is not None else set()
    return [p for name, p in root.named_parameters() if config is not None and name not in trainable]


def freeze_outside_adapters(model: nn.Module, optimizers: Optional[Optimizers] = None) -> list[str]:
    """Freeze every parameter the model's LoRA configuration does not train, for real: ``requires_grad=False``, out
    of the optimizer's param groups and state. Never unfreezes anything.

    :func:`apply_lora` ends with it; ``LoRAInject`` calls it at ``Event.BEFORE_LOAD``, after all INIT-time surgery,
    so that parameters another algorithm created in the meantime (e.g. Composer's Factorize replacing a frozen base
    layer) are frozen too.

    Returns:
        The names of the parameters frozen.
    """
    root = user_module(model)
    config = lora_config_of(root)
    if config is None:
        raise ValueError(f'{type(root).__name__} has no LoRA adapters: apply_lora (or LoRAInject) first.')
    trainable = set(trainable_parameter_names(root, config))
    frozen = {name: p for name, p in root.named_parameters() if name not in trainable}
    for param in frozen.values():
        param.requires_grad_(False)
    optimizer = single_optimizer(optimizers)
    if optimizer is not None:
        remove_params(optimizer, frozen.values())
    return list(frozen)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (for inference or export); the forward pass uses the base alone."""
    for layer in adapter_layers(user_module(model)).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (exact up to the rounding of the weights' dtype)."""
    for layer in adapter_layers(user_module(model)).values():
        layer.unmerge()


@torch.no_grad()
def adapters_in_base_dtype(model: nn.Module) -> list[str]:
    """Cast the adapters of each low-precision (bf16/fp16) base layer to the base's dtype, in place; returns the
    names of the layers cast.

    On a half-precision base, adapters are fp32 (PEFT's ``autocast_adapter_dtype``). FSDP2 all-gathers the parameters
    of one sharded module in one dtype, so a sharded model keeps an adapter in its base's dtype instead; with
    ``master_weights='fp32'`` it still trains through an fp32 master and fp32 optimizer state. The parameters stay
    the same objects (optimizers keep them).

    Example:
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> bf16_model = tiny_decoder(num_layers=1).model.to(torch.bfloat16)
        >>> _ = apply_lora(bf16_model, r=8, target_modules=['q_proj'])
        >>> q_proj = bf16_model.model.layers[0].self_attn.q_proj
        >>> q_proj.lora_A.dtype, q_proj.lora_B.dtype
        (torch.float32, torch.float32)
        >>> adapters_in_base_dtype(bf16_model)
        ['model.layers.0.self_attn.q_proj']
        >>> q_proj.lora_A.dtype, q_proj.lora_B.dtype  # now bf16, ready for fully_shard
        (torch.bfloat16, torch.bfloat16)
    """
    cast = []
    for name, layer in adapter_layers(user_module(model)).items():
        base = getattr(layer.base_layer, 'weight', None)
        if not isinstance(base, torch.Tensor) or base.dtype not in LOW_PRECISION_DTYPES:
            continue
        for param in layer.adapter_parameters().values():
            if param.dtype != base.dtype:
                param.data = param.data.to(base.dtype)
                cast.append(name)
    return sorted(set(cast))
