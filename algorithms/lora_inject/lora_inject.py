"""LoRA as Composer model surgery: :func:`apply_lora` (functional) and :class:`LoRAInject` (the algorithm).

Example:
    >>> from composer import Trainer
    >>> from composer_thaw.lora_inject import LoRAInject
    >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration='1ep',
    ...                   algorithms=[LoRAInject(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])])

Resuming: Composer only re-applies its own surgery algorithms on checkpoint load, so pass the same
``LoRAInject(...)`` to the Trainer that loads a checkpoint written with it.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from torch import nn

from composer_thaw.algorithm_state import STATE_VERSION_KEY, ConfigRepr, check_state_version, refuse_duplicates
from composer_thaw.lora_inject.config import LoRAConfig
from composer_thaw.lora_inject.injection import (
    adapter_layers,
    check_not_peft,
    inject,
    plan_injection,
    saved_module_names,
)
from composer_thaw.lora_inject.layers import adapter_class_for
from composer_thaw.lora_inject.resume import refuse_adapters_of_another_rank
from composer_thaw.optimizer_surgery import Optimizers, add_params, group_index_of, remove_params, single_optimizer
from composer_thaw.parameter_selection import user_module
from composer_thaw.resume_compatibility import check_resume_config, resume_state
from composer_thaw.sharding import refuse_fsdp1

log = logging.getLogger(__name__)

__all__ = [
    'EXAMPLES',
    'LoRAInject',
    'LoRASummary',
    'apply_lora',
    'check_no_conflicting_algorithms',
    'freeze_outside_adapters',
    'lora_config_of',
    'merge_adapters',
    'trainable_parameter_names',
    'unmerge_adapters',
]

# Valid on tiny_decoder('llama', num_layers=4); the conformance suite runs each.
EXAMPLES: tuple[dict[str, Any], ...] = (
    {'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj', 'v_proj']},
    {
        'r': 4,
        'lora_alpha': 4,
        'target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
        'use_dora': True,
        'layers_to_transform': [2, 3],
    },
    {
        'r': 2,
        'lora_alpha': 4,
        'target_modules': ['embed_tokens', 'o_proj'],
        'use_rslora': True,
        'rank_pattern': {'o_proj': 4},
        'bias': 'all',
    },
)

_CONFIG_ATTRIBUTE = 'thaw_lora_config'  # set on the user's model once adapters are injected


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
    return getattr(user_module(model), _CONFIG_ATTRIBUTE, None)


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
        config: a :class:`LoRAConfig`; or pass its fields as keyword arguments.

    Returns:
        A :class:`LoRASummary`.

    Raises:
        ValueError: on an invalid configuration, a target that matches nothing or has an unsupported type, a model
            already adapted with another configuration, or a PEFT model.
    """
    if config is None:
        config = LoRAConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError('Pass either config or its fields as keyword arguments, not both.')
    summary = _inject_adapters(model, optimizers, config)
    freeze_outside_adapters(model, optimizers)
    return summary


def _inject_adapters(model: nn.Module, optimizers: Optional[Optimizers], config: LoRAConfig) -> LoRASummary:
    """:func:`apply_lora` but for taking the frozen parameters out of the optimizer: they stay there, with
    ``requires_grad=False``, until :func:`freeze_outside_adapters` (so surgery that runs in between, such as
    Composer's Factorize, finds the parameters it replaces in the optimizer)."""
    root = user_module(model)
    check_not_peft(model, root)
    optimizer = single_optimizer(optimizers)
    existing = getattr(root, _CONFIG_ATTRIBUTE, None)
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
    setattr(root, _CONFIG_ATTRIBUTE, config)

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
    if getattr(root, 'is_gradient_checkpointing', False) and enable_input_require_grads is not None:
        # Re-entrant checkpointing only back-propagates into blocks whose inputs require grad; the embeddings are
        # frozen.
        enable_input_require_grads()

    layers = adapter_layers(root)
    trainable_numel = sum(p.numel() for p in root.parameters() if p.requires_grad)
    total_numel = sum(p.numel() for p in root.parameters())
    log.info('LoRA: adapted %d modules; %d of %d parameters train.', len(layers), trainable_numel, total_numel)
    _warn_if_task_head_frozen(root)
    return LoRASummary(tuple(layers), trainable_numel, total_numel)


# Hugging Face task models whose head is new when fine-tuning starts, and the head's name; PEFT's task types add
# these to modules_to_save (SEQ_CLS and TOKEN_CLS: classifier, score; QUESTION_ANS: qa_outputs).
_TASK_HEADS = {
    'ForSequenceClassification': ('classifier', 'score'),
    'ForTokenClassification': ('classifier', 'score'),
    'ForQuestionAnswering': ('qa_outputs',),
}


def _warn_if_task_head_frozen(root: nn.Module) -> None:
    """Warn when a task model's head (usually freshly initialized) keeps its own weights frozen: only the adapters
    around it would learn, on top of random weights."""
    heads = next((names for suffix, names in _TASK_HEADS.items() if type(root).__name__.endswith(suffix)), ())
    for name in heads:
        head = getattr(root, name, None)
        weights = [p for n, p in head.named_parameters() if 'lora_' not in n] if isinstance(head, nn.Module) else []
        if weights and not any(p.requires_grad for p in weights):
            warnings.warn(
                f'LoRAInject: the head {name!r} of {type(root).__name__} stays frozen; a task head is usually newly '
                f'initialized, so its random weights would never train. Add it to modules_to_save '
                f"(modules_to_save=['{name}'], as PEFT's task types do).",
                UserWarning,
                stacklevel=3,
            )


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


def _check_base_layers_kept(root: nn.Module, config: LoRAConfig, save_merged: bool) -> None:
    """After INIT-time surgery by other algorithms: a base layer replaced by a type LoRA cannot adapt (Factorize's
    ``FactorizedLinear``) still works under plain LoRA (its forward is used as is), but has no weight for DoRA or for
    merging."""
    replaced = {
        name: type(layer.base_layer).__name__
        for name, layer in adapter_layers(root).items()
        if adapter_class_for(layer.base_layer) is None
    }
    if replaced and (config.use_dora or save_merged):
        what = 'use_dora=True needs' if config.use_dora else 'save_merged_to needs'
        raise ValueError(
            f'Another algorithm replaced base layers of LoRA adapters ({replaced}); {what} their weight matrix. '
            'Leave these modules out of the other algorithm, or out of LoRA (put LoRAInject after it and choose '
            'target_modules that it did not replace).',
        )
    if replaced:
        log.info('LoRA: base layers replaced by another algorithm after injection (kept frozen): %s', replaced)


def _expose_merged_model_to_hugging_face(model: nn.Module) -> None:
    """Under Composer, the Hugging Face model's own state dict is the merged plain model's (for ``save_pretrained``
    and llm-foundry's ``hf_checkpointer``); Composer's model around it, which checkpoints save, keeps the adapters.

    Only for a ``transformers`` model inside Composer's wrapper: were it ``state.model`` itself, checkpoints would
    lose the adapters.
    """
    from transformers import PreTrainedModel

    from composer_thaw.lora_inject.peft_format import expose_merged_state_dict

    root = user_module(model)
    if root is not model and isinstance(root, PreTrainedModel):
        expose_merged_state_dict(root)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (for inference or export); the forward pass uses the base alone."""
    for layer in adapter_layers(user_module(model)).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (exact up to the rounding of the weights' dtype)."""
    for layer in adapter_layers(user_module(model)).values():
        layer.unmerge()


def check_no_conflicting_algorithms(algorithms: Sequence[Algorithm], config: LoRAConfig) -> None:
    """Refuse algorithms that would override what LoRA trains (before LoRA changes anything).

    ``RegexFreeze`` decides on its own which parameters train, after LoRA's surgery: it would freeze the adapters
    (they match none of its ``trainable`` patterns) or ask to train LoRA's frozen base. LoRA itself says what trains
    besides the adapters: whole modules with ``modules_to_save``, biases with ``bias``.
    """
    from composer_thaw.regex_freeze import RegexFreeze

    for algorithm in algorithms:
        if isinstance(algorithm, RegexFreeze):
            # plain module names among its trainable patterns ('lm_head', 'model.norm.weight' -> 'model.norm')
            plain = [p for p in algorithm.trainable or [] if re.fullmatch(r'[\w.]+', p)]
            named = [re.sub(r'\.(weight|bias)$', '', p) for p in plain]
            saved = list(dict.fromkeys([*(config.modules_to_save or []), *named])) or ['lm_head']
            raise ValueError(
                f'LoRAInject cannot be combined with {algorithm!r}: both decide which parameters train, and '
                'RegexFreeze would freeze the LoRA adapters (they match none of its trainable patterns) or train '
                "LoRA's frozen base weights. To train modules in full next to the adapters, name them in LoRAInject "
                f'and drop RegexFreeze: LoRAInject(..., modules_to_save={saved!r}) trains those whole modules (e.g. '
                "a head) next to the adapters, with the rest of the base frozen; bias='all' or 'lora_only' trains "
                'biases.',
            )


def _copy_of_mapping(value: Any) -> Any:
    """A copy of a ``{pattern: value}`` argument (``{}`` for ``None``); LoRAConfig refuses other types."""
    if value is None:
        return {}
    return dict(value) if isinstance(value, dict) else value


class LoRAInject(ConfigRepr, Algorithm):
    """Low-rank adapters (LoRA, DoRA, rsLoRA, PiSSA) injected at ``Event.INIT``.

    The arguments are those of :class:`~composer_thaw.lora_inject.config.LoRAConfig`, plus:

    Args:
        save_adapter_to: at ``Event.FIT_END``, write the adapter in PEFT's format (``adapter_config.json`` +
            ``adapter_model.safetensors``) to this directory.
        save_merged_to: at ``Event.FIT_END``, write the merged model as a plain Hugging Face checkpoint
            (``save_pretrained`` layout) to this directory.

    The Hugging Face model's own ``state_dict()`` (``state.model.model``: what ``save_pretrained`` and llm-foundry's
    ``hf_checkpointer`` save) is the merged plain model, so they write a normal Hugging Face folder with the adapters
    merged in; Composer's checkpoints (the state dict of ``state.model``) keep the adapters apart. See
    :func:`~composer_thaw.lora_inject.peft_format.expose_merged_state_dict`.

    Resume a checkpoint written with ``LoRAInject`` by passing the same ``LoRAInject`` to the new Trainer: Composer
    re-applies only its own surgery algorithms automatically. A checkpoint written without LoRA (a plain run) loads
    with ``load_weights_only=True``: its weights become the base weights and the adapters start at their
    initialisation (see :class:`~composer_thaw.lora_inject.layers.LoRALayer`).

    ``RegexFreeze`` in the same Trainer is refused (at ``Event.INIT``, before anything changes): it would override
    what LoRA trains. Train extra modules in full with ``modules_to_save``, biases with ``bias``.
    """

    # INIT: inject (frozen parameters get requires_grad=False); BEFORE_LOAD, after all INIT-time surgery: take the
    # frozen parameters out of the optimizer; FIT_END: only with save_adapter_to / save_merged_to.
    events: tuple[Event, ...] = (Event.INIT, Event.BEFORE_LOAD, Event.FIT_END)
    # What shapes the adapters and what they compute; a checkpoint's adapters resume only under the same values.
    resume_fields = (
        'r',
        'lora_alpha',
        'target_modules',
        'exclude_modules',
        'layers_to_transform',
        'layers_pattern',
        'rank_pattern',
        'alpha_pattern',
        'use_rslora',
        'use_dora',
        'init',
        'bias',
        'modules_to_save',
        'enable_slices',
    )

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 8,
        target_modules: Optional[Union[list[str], str]] = None,
        exclude_modules: Optional[Union[list[str], str]] = None,
        layers_to_transform: Optional[Union[list[int], int]] = None,
        layers_pattern: Optional[Union[list[str], str]] = None,
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: Literal['kaiming', 'gaussian', 'pissa'] = 'kaiming',
        bias: Literal['none', 'all', 'lora_only'] = 'none',
        modules_to_save: Optional[list[str]] = None,
        enable_slices: Optional[dict[str, list[bool]]] = None,
        save_adapter_to: Optional[str] = None,
        save_merged_to: Optional[str] = None,
    ):
        self.r, self.lora_alpha, self.target_modules = r, lora_alpha, target_modules
        self.exclude_modules = exclude_modules
        self.layers_to_transform, self.layers_pattern = layers_to_transform, layers_pattern
        self.rank_pattern, self.alpha_pattern = rank_pattern, alpha_pattern
        self.lora_dropout, self.use_rslora, self.use_dora = lora_dropout, use_rslora, use_dora
        self.init, self.bias, self.modules_to_save, self.enable_slices = init, bias, modules_to_save, enable_slices
        self.save_adapter_to, self.save_merged_to = save_adapter_to, save_merged_to
        for key in ('save_adapter_to', 'save_merged_to'):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f'{key}={value!r} is invalid: give a directory path (string) or None.')
        self.config = LoRAConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
            rank_pattern=_copy_of_mapping(rank_pattern),
            alpha_pattern=_copy_of_mapping(alpha_pattern),
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            use_dora=use_dora,
            init=init,
            bias=bias,
            modules_to_save=modules_to_save,
            enable_slices=_copy_of_mapping(enable_slices),
        )

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event in self.events and (event != Event.FIT_END or bool(self.save_adapter_to or self.save_merged_to))

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            refuse_duplicates(
                self, state.algorithms, 'give one LoRAInject (rank_pattern and alpha_pattern set per-target ranks).'
            )
            check_no_conflicting_algorithms(state.algorithms, self.config)
            refuse_fsdp1(state, 'LoRAInject')
            # The same adapter initialization on every rank, as Composer does before sharding: FSDP2 keeps each rank's
            # own rows, so per-rank seeds would give a model that no single process could have built.
            with reproducibility.seed_context(state.rank_zero_seed):
                summary = _inject_adapters(state.model, state.optimizers, self.config)
            _expose_merged_model_to_hugging_face(state.model)
            logger.log_metrics(
                {
                    'lora_inject/adapted_modules': len(summary.adapted),
                    'lora_inject/trainable_params': summary.trainable_params,
                    'lora_inject/trainable_fraction': summary.trainable_fraction,
                }
            )
            return
        if event == Event.BEFORE_LOAD:
            _check_base_layers_kept(user_module(state.model), self.config, bool(self.save_merged_to))
            freeze_outside_adapters(state.model, state.optimizers)
            refuse_adapters_of_another_rank(state.model, self)  # checked as Composer loads the checkpoint's weights
            return
        from composer_thaw.lora_inject.peft_format import export_merged, save_adapter

        # On every rank: under FSDP2 the whole tensors are gathered from all of them; rank 0 writes.
        if self.save_adapter_to:
            save_adapter(state.model, self.save_adapter_to)
        if self.save_merged_to:
            export_merged(state.model, self.save_merged_to)
        dist.barrier()

    def state_dict(self) -> dict[str, Any]:
        return {STATE_VERSION_KEY: 1, 'repr': repr(self), 'config': self.config.to_dict(), **resume_state(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version('LoRAInject', state, supported=1)
        check_resume_config(self, state)
