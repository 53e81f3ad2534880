"""Find the modules to adapt, check everything, then replace them: :func:`plan_injection` and :func:`inject`.

Planning reads the model and never changes it; every error a user can cause (a target that matches nothing, a
module of an unsupported type, a rank that does not fit, an already-PEFT model) is raised there. :func:`inject`
then only performs the planned replacements and cannot fail half-way on bad input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, TypedDict, Union

from torch import nn

from composer_thaw.core.validation import closest_names
from composer_thaw.lora_inject.config import ALL_LINEAR, DEFAULT_TARGET_MODULES, TASK_MODULES_TO_SAVE, LoRAConfig
from composer_thaw.lora_inject.layers import (
    SUPPORTED_TYPES,
    LoRAConv,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    _weight_of,
    adapter_class_for,
    is_conv1d_transposed,
    is_quantized,
)
from composer_thaw.lora_inject.matching import (
    is_excluded,
    is_saved,
    is_target,
    matches_name_list,
    matches_target_modules,
    saved_modules,
)

__all__ = [
    'AdapterTarget',
    'InjectionPlan',
    'adapter_layers',
    'all_linear_names',
    'check_not_peft',
    'default_target_modules',
    'inject',
    'output_layer_name',
    'plan_injection',
    'saved_module_names',
    'selectable_modules',
]


@dataclass(frozen=True)
class AdapterTarget:
    """One module to adapt and the adapter it gets."""

    name: str
    layer_class: type[LoRALayer]
    r: int
    lora_alpha: float
    enabled_slices: Optional[tuple[bool, ...]] = None


@dataclass
class InjectionPlan:
    """Everything :func:`inject` will do: the adapters, and which existing parameters stay trainable."""

    targets: list[AdapterTarget]
    modules_to_save: list[str] = field(default_factory=list)  # module names trained in full

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]


def adapter_layers(root: nn.Module) -> dict[str, LoRALayer]:
    """The adapter layers in ``root`` by module name."""
    return {name: module for name, module in root.named_modules() if isinstance(module, LoRALayer)}


def check_not_peft(model: nn.Module, root: nn.Module) -> None:
    """Refuse a model that PEFT already adapted (``PeftModel``, ``HuggingFaceModel(peft_config=...)``)."""
    for module in (model, root, *root.modules()):
        module_path = type(module).__module__
        if module_path.startswith('peft.') or module_path == 'peft':
            raise ValueError(
                f'The model is already a PEFT model (found {type(module).__name__} from {module_path}): LoRAInject '
                'would adapt it twice. Pass the plain Hugging Face model (without `peft_config` in HuggingFaceModel, '
                'without get_peft_model), or load a PEFT adapter into the plain model with '
                '`composer_thaw.lora_inject.load_adapter(model, directory)`.',
            )


def selectable_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The modules the selection rules see, by name: all of ``root``'s but the root itself and the insides of
    adapter layers (an adapted module is seen under its own name, as PEFT skips its adapters' internals).

    Example:
        >>> sorted(selectable_modules(nn.Sequential(nn.Linear(2, 2))))
        ['0']
    """
    inside: set[str] = set()
    for name, module in root.named_modules():
        if isinstance(module, LoRALayer):
            inside |= {f'{name}.{child}' for child, _ in module.named_modules() if child}
    return {name: module for name, module in root.named_modules() if name and name not in inside}


def output_layer_name(root: nn.Module) -> Optional[str]:
    """The name of the output layer ``'all-linear'`` leaves out, as PEFT: ``get_output_embeddings()`` of a
    transformers ``PreTrainedModel`` (the LM head), else ``None`` (a classifier's head is not left out).

    Example:
        >>> output_layer_name(nn.Sequential(nn.Linear(2, 2))) is None
        True
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(root, PreTrainedModel):
        return None
    get_output_embeddings: Any = root.get_output_embeddings  # untyped before transformers 4.53
    output = get_output_embeddings()
    if output is None:
        return None
    return next((name for name, module in root.named_modules() if module is output), None)


def all_linear_names(root: nn.Module, candidates: dict[str, nn.Module]) -> list[str]:
    """What ``'all-linear'`` stands for (PEFT's ``_maybe_include_all_linear_layers``): the full names of every
    ``nn.Linear``, transformers ``Conv1D`` and linear adapter layer, but the output layer (:func:`output_layer_name`)
    and the projections attention bypasses (:func:`attention_bypassed_names`). They are then matched as a
    ``target_modules`` list.

    Example:
        >>> all_linear_names(nn.Sequential(nn.Linear(2, 2)), selectable_modules(nn.Sequential(nn.Linear(2, 2))))
        ['0']
    """
    left_out = {output_layer_name(root), *attention_bypassed_names(root)}
    return [
        name
        for name, module in candidates.items()
        if (isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d_transposed(module)) and name not in left_out
    ]


def attention_bypassed_names(root: nn.Module) -> set[str]:
    """Linear layers whose forward never runs: the ``out_proj`` of every ``nn.MultiheadAttention``, which reads
    ``out_proj.weight`` directly (an adapter there would silently do nothing).

    Example:
        >>> attention_bypassed_names(nn.Sequential(nn.MultiheadAttention(8, 2)))
        {'0.out_proj'}
    """
    return {
        f'{name}.out_proj' if name else 'out_proj'
        for name, module in root.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def default_target_modules(root: nn.Module) -> Union[str, list[str]]:
    """``target_modules=None``: the entry of :data:`DEFAULT_TARGET_MODULES` for ``root.config.model_type``.

    Example:
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> default_target_modules(tiny_decoder(num_layers=1).model)  # a LLaMA
        ['q_proj', 'v_proj']
    """
    model_type = getattr(getattr(root, 'config', None), 'model_type', None)
    if model_type not in DEFAULT_TARGET_MODULES:
        known = ', '.join(sorted(DEFAULT_TARGET_MODULES))
        raise ValueError(
            f'target_modules=None asks for the default targets of the model type, but there is no default for '
            f'model_type={model_type!r} ({type(root).__name__}). Name the modules, e.g. '
            f"target_modules=['q_proj', 'v_proj'], or use 'all-linear'. Model types with a default: {known}.",
        )
    targets = DEFAULT_TARGET_MODULES[model_type]
    return targets if isinstance(targets, str) else list(targets)


def saved_module_names(root: nn.Module, config: LoRAConfig) -> list[str]:
    """The modules ``config.modules_to_save`` (and the heads of ``config.task_type``) trains in full
    (:func:`~composer_thaw.lora_inject.matching.saved_modules`: every module whose name ends with an entry, outermost
    only), in model order.

    Example:
        >>> from transformers import DistilBertConfig, DistilBertForSequenceClassification
        >>> config = DistilBertConfig(vocab_size=64, dim=16, hidden_dim=32, n_layers=1, n_heads=2)
        >>> saved_module_names(DistilBertForSequenceClassification(config), LoRAConfig(modules_to_save=['classifier']))
        ['pre_classifier', 'classifier']
    """
    return saved_modules(selectable_modules(root), config.saved_entries())


def _check_target(name: str, module: nn.Module, config: LoRAConfig, r: int, slices) -> type[LoRALayer]:
    if isinstance(module, LoRALayer):
        raise ValueError(f'{name} is already adapted ({type(module).__name__}) with a different configuration.')
    layer_class = adapter_class_for(module)
    if layer_class is None:
        raise ValueError(
            f'target {name!r} is a {type(module).__module__}.{type(module).__name__}, which LoRAInject cannot adapt. '
            f'Supported types: {", ".join(SUPPORTED_TYPES)}. Name the layers inside it instead (e.g. '
            f'{name}.<linear layer>).',
        )
    quantized = is_quantized(module)
    if quantized and (config.use_dora or config.init == 'pissa'):
        raise ValueError(f'{name} is quantized ({type(module).__name__}): DoRA and PiSSA need a floating-point base.')
    if config.init == 'pissa' and layer_class is not LoRALinear:
        raise ValueError(f"init='pissa' supports linear layers only; target {name!r} is a {type(module).__name__}.")
    if layer_class is LoRAConv and (module.groups != 1 or module.padding_mode != 'zeros'):
        raise ValueError(
            f'target {name!r} is a {type(module).__name__} with groups={module.groups}, padding_mode='
            f"{module.padding_mode!r}; LoRA supports groups=1 and padding_mode='zeros' only.",
        )
    if slices is not None:
        if layer_class is not LoRALinear:
            raise ValueError(f'enable_slices applies to linear layers; target {name!r} is a {type(module).__name__}.')
        # a linear layer, or transformers' Conv1D (weight stored (in, out))
        out_features = module.out_features if isinstance(module, nn.Linear) else _weight_of(module).shape[1]
        if out_features % len(slices):
            raise ValueError(
                f'enable_slices for {name!r} has {len(slices)} slices, which do not divide its {out_features} output '
                'features evenly.',
            )
    return layer_class


def _check_has_adaptable_modules(root: nn.Module, candidates: dict[str, nn.Module]) -> None:
    """Refuse a model LoRA cannot adapt at all, saying why (instead of a target error with nothing to suggest)."""
    if any(isinstance(m, LoRALayer) or adapter_class_for(m) is not None for m in candidates.values()):
        return
    if not any(True for _ in root.parameters()):
        raise ValueError(
            f'{type(root).__name__} has no parameters, so LoRA has nothing to adapt: LoRAInject adds adapters to the '
            f'weights of layers ({", ".join(SUPPORTED_TYPES)}). Pass the model that holds the layers to fine-tune.',
        )
    owners = sorted({type(m).__name__ for m in root.modules() if any(True for _ in m.parameters(recurse=False))})
    raise ValueError(
        f'{type(root).__name__} has no module of a type LoRA can adapt: its parameters belong to {", ".join(owners)}; '
        f'LoRAInject adapts {", ".join(SUPPORTED_TYPES)}.',
    )


def _checked_saved_modules(root: nn.Module, config: LoRAConfig, candidates: dict[str, nn.Module]) -> list[str]:
    """:func:`saved_module_names`, refusing an entry that saves nothing (PEFT ignores it silently: a typo)."""
    for entry in config.modules_to_save or []:
        if not any(is_saved(name, [entry]) for name in candidates):
            raise ValueError(
                f'modules_to_save entry {entry!r} matches no module of {type(root).__name__} (a module is saved when '
                f'its name ends with an entry). Did you mean one of {closest_names(entry, sorted(candidates))}?',
            )
    task_heads = list(TASK_MODULES_TO_SAVE.get(config.task_type or '', ()))
    if task_heads and not any(is_saved(name, task_heads) for name in candidates):
        warnings.warn(
            f'task_type={config.task_type!r} trains the heads named {task_heads} in full, as in PEFT, but '
            f'{type(root).__name__} has no module whose name ends with one of them: name its head in modules_to_save.',
            UserWarning,
            stacklevel=3,
        )
    return saved_modules(candidates, config.saved_entries())


def _resolved_target_modules(
    root: nn.Module, config: LoRAConfig, candidates: dict[str, nn.Module]
) -> Union[str, list[str]]:
    """``config.target_modules`` with ``None`` and ``'all-linear'`` replaced by what they stand for."""
    targets = config.target_modules
    if targets is None:
        return default_target_modules(root)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        names = all_linear_names(root, candidates)
        if not names:
            raise ValueError(f"target_modules='{ALL_LINEAR}' found no linear layer in {type(root).__name__}.")
        return names
    return targets


def _check_each_entry_matches(root: nn.Module, config: LoRAConfig, names: list[str]) -> None:
    """Refuse a ``target_modules`` list entry that matches no module (PEFT only refuses a list that matches nothing
    at all, so a misspelt entry next to a good one would go unnoticed)."""
    targets = config.target_modules
    if not isinstance(targets, list):
        return
    for entry in targets:
        if not any(matches_name_list(name, [entry]) for name in names):
            leaves = sorted({name.rsplit('.', 1)[-1] for name in names} | set(names))
            raise ValueError(
                f'target_modules entry {entry!r} matches no module of {type(root).__name__}. '
                f'Did you mean one of {closest_names(entry, leaves)}?',
            )


def _select_targets(
    root: nn.Module, config: LoRAConfig, candidates: dict[str, nn.Module], saved: list[str]
) -> list[str]:
    """The names of the modules to adapt, in model order (:mod:`~composer_thaw.lora_inject.matching`'s rules), or a
    ValueError saying which option left nothing."""
    targets = _resolved_target_modules(root, config, candidates)
    names = list(candidates)
    _check_each_entry_matches(root, config, names)
    matched = [name for name in names if matches_target_modules(name, targets)]
    if not matched:
        if isinstance(targets, str):
            raise ValueError(
                f'target_modules={targets!r} matches no module of {type(root).__name__} (the regex must match the '
                f'whole name). Close names: {closest_names(targets, candidates)}.',
            )
        raise ValueError(
            f'target_modules=None stands for {targets} (the default of the model type), which matches no module of '
            f"{type(root).__name__}. Name the modules, e.g. target_modules=['q_proj', 'v_proj'], or use "
            f"'{ALL_LINEAR}'.",
        )
    layers, pattern = config.layers_to_transform, config.layers_pattern
    in_layers = [name for name in matched if matches_target_modules(name, targets, layers, pattern)]
    if not in_layers:
        raise ValueError(
            f'layers_to_transform={layers!r} (layers_pattern={pattern!r}) leaves no target: no matched module is '
            'inside a block with one of those indices.',
        )
    if config.exclude_modules and not any(is_excluded(name, config.exclude_modules) for name in names):
        warnings.warn(f'exclude_modules={config.exclude_modules!r} excludes no module.', stacklevel=2)
    kept = [
        name
        for name in in_layers
        if is_target(
            name,
            targets,
            exclude_modules=config.exclude_modules,
            modules_to_save=config.saved_entries(),
            layers_to_transform=layers,
            layers_pattern=pattern,
        )
    ]
    if not kept:
        raise ValueError(
            f'target_modules={config.target_modules!r} matches {in_layers[:5]}{"..." if len(in_layers) > 5 else ""}, '
            f'but exclude_modules={config.exclude_modules!r} and modules_to_save={config.saved_entries()!r} leave '
            'none of them to adapt (a module named like a modules_to_save entry, or inside one, is never adapted).',
        )
    for name in kept:
        owner = next((s for s in saved if name == s or name.startswith(s + '.')), None)
        if owner is not None:
            raise ValueError(
                f'{name!r} would be both adapted and trained in full: modules_to_save={config.saved_entries()!r} '
                f"saves {owner!r}, because a module is saved when its name ends with an entry (PEFT's rule: "
                "'classifier' also saves 'pre_classifier'), but only a module named exactly like an entry, or inside "
                f'one, is kept out of the targets. Add {name!r} to exclude_modules to train it in full only, or '
                'leave it out of target_modules.',
            )
    return kept


def plan_injection(root: nn.Module, config: LoRAConfig) -> InjectionPlan:
    """Decide what :func:`inject` will do, raising on any problem before anything changes.

    Modules that are already adapters with exactly the planned configuration are left out of the plan (applying
    twice is applying once).
    """
    candidates = selectable_modules(root)
    _check_has_adaptable_modules(root, candidates)
    saved = _checked_saved_modules(root, config, candidates)
    targets = []
    bypassed = attention_bypassed_names(root)
    for name in _select_targets(root, config, candidates, saved):
        module = candidates[name]
        if name in bypassed:
            raise ValueError(
                f'target {name!r} is the output projection of an nn.MultiheadAttention, which reads its weight '
                'directly, so an adapter there would never be used. Leave it out of target_modules (exclude_modules='
                f"[{name.rsplit('.', 1)[-1]!r}]) and adapt other layers (e.g. the MLP's).",
            )
        r, alpha, slices = config.rank_of(name), config.alpha_of(name), config.slices_of(name)
        if isinstance(module, LoRALayer) and (
            module.r,
            module.lora_alpha,
            module.use_dora,
            module.use_rslora,
            getattr(module, 'enabled_slices', None),
        ) == (r, alpha, config.use_dora, config.use_rslora, slices):
            continue
        layer_class = _check_target(name, module, config, r, slices)
        targets.append(AdapterTarget(name, layer_class, r, alpha, slices))
    return InjectionPlan(targets, saved)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class _LayerOptions(TypedDict):
    """The constructor arguments every adapter layer takes."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    init: str


def inject(root: nn.Module, plan: InjectionPlan, config: LoRAConfig) -> dict[str, LoRALayer]:
    """Replace each planned module by its adapter layer; returns the new layers by name."""
    created: dict[str, LoRALayer] = {}
    for target in plan.targets:
        base = root.get_submodule(target.name)
        common = _LayerOptions(
            r=target.r,
            lora_alpha=target.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            init=config.init,
        )
        layer: LoRALayer
        if target.layer_class is LoRALinear:
            layer = LoRALinear(base, enabled_slices=target.enabled_slices, **common)
        elif target.layer_class is LoRAEmbedding:
            assert isinstance(base, nn.Embedding)  # adapter_class_for chose LoRAEmbedding for it
            layer = LoRAEmbedding(base, **common)
        else:
            assert isinstance(base, (nn.Conv1d, nn.Conv2d))  # adapter_class_for chose LoRAConv for it
            layer = LoRAConv(base, **common)
        if not base.training:
            layer.eval()
        _set_module(root, target.name, layer)
        created[target.name] = layer
    return created
