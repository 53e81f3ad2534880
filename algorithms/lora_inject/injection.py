"""Find the modules to adapt, check everything, then replace them: :func:`plan_injection` and :func:`inject`.

Planning reads the model and never changes it; every error a user can cause (a target that matches nothing, a
module of an unsupported type, a rank that does not fit, an already-PEFT model) is raised there. :func:`inject`
then only performs the planned replacements and cannot fail half-way on bad input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, TypedDict

from torch import nn

from algorithms.lora_inject.config import ALL_LINEAR, DEFAULT_TARGET_MODULES, LoRAConfig
from algorithms.lora_inject.layers import (
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
from algorithms.parameter_selection import closest_names

__all__ = [
    'AdapterTarget',
    'InjectionPlan',
    'adapter_layers',
    'check_not_peft',
    'inject',
    'matches_name',
    'output_head_names',
    'plan_injection',
]

_CLASSIFIER_HEAD_NAMES = ('score', 'classifier')  # PEFT's SEQ_CLS_HEAD_NAMES


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


def matches_name(name: str, entries: list[str]) -> bool:
    """PEFT's list rule: ``name`` equals an entry or ends with ``'.' + entry``."""
    return any(name == entry or name.endswith('.' + entry) for entry in entries)


def check_not_peft(model: nn.Module, root: nn.Module) -> None:
    """Refuse a model that PEFT already adapted (``PeftModel``, ``HuggingFaceModel(peft_config=...)``)."""
    for module in (model, root, *root.modules()):
        module_path = type(module).__module__
        if module_path.startswith('peft.') or module_path == 'peft':
            raise ValueError(
                f'The model is already a PEFT model (found {type(module).__name__} from {module_path}): LoRAInject '
                'would adapt it twice. Pass the plain Hugging Face model (without `peft_config` in HuggingFaceModel, '
                'without get_peft_model), or load a PEFT adapter into the plain model with '
                '`algorithms.lora_inject.load_adapter(model, directory)`.',
            )


def output_head_names(root: nn.Module) -> set[str]:
    """Names of output heads that ``'all-linear'`` leaves out: the LM head, or a classifier's ``score``/``classifier``
    (PEFT's ``'all-linear'`` leaves out the output layer too).
    """
    heads = set()
    get_output = getattr(root, 'get_output_embeddings', None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads |= {name for name, module in root.named_modules() if module is output}
    for name in _CLASSIFIER_HEAD_NAMES:
        head = getattr(root, name, None)
        if isinstance(head, nn.Module):
            # a head that is a Sequential/MLP: leave out its last linear layer
            linear = [n for n, m in head.named_modules() if isinstance(m, nn.Linear) or is_conv1d_transposed(m)]
            if linear:
                heads.add(f'{name}.{linear[-1]}' if linear[-1] else name)
    return heads


def _layer_index(name: str, layers_pattern: Optional[str]) -> Optional[int]:
    pattern = rf'.*\.{layers_pattern}\.(\d+)\.' if layers_pattern else r'.*\.[^.]*\.(\d+)\.'
    match = re.match(pattern, name)
    return int(match.group(1)) if match else None


def _candidate_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Modules that may be targeted: all but the insides of adapter layers (already adapted modules are kept)."""
    inside: set[str] = set()
    for name, module in root.named_modules():
        if isinstance(module, LoRALayer):
            inside |= {f'{name}.{child}' for child, _ in module.named_modules() if child}
    return {name: module for name, module in root.named_modules() if name and name not in inside}


def _resolve_targets(root: nn.Module, config: LoRAConfig, candidates: dict[str, nn.Module]) -> list[str]:
    targets = config.target_modules
    saved = config.modules_to_save or []
    if targets is None:
        model_type = getattr(getattr(root, 'config', None), 'model_type', None)
        if model_type not in DEFAULT_TARGET_MODULES:
            known = ', '.join(sorted(DEFAULT_TARGET_MODULES))
            raise ValueError(
                f'target_modules=None asks for the default targets of the model type, but there is no default for '
                f'model_type={model_type!r} ({type(root).__name__}). Name the modules, e.g. '
                f"target_modules=['q_proj', 'v_proj'], or use 'all-linear'. Model types with a default: {known}.",
            )
        targets = list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(root)
        names = [
            name
            for name, module in candidates.items()
            if (isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d_transposed(module))
            and name not in heads
            and not matches_name(name, saved)
        ]
        if not names:
            raise ValueError(f"target_modules='{ALL_LINEAR}' found no linear layer in {type(root).__name__}.")
    elif isinstance(targets, str):
        names = [name for name in candidates if re.fullmatch(targets, name)]
        if not names:
            raise ValueError(
                f'target_modules={targets!r} matches no module of {type(root).__name__} (the regex must match the '
                f'whole name). Close names: {closest_names(targets, candidates)}.',
            )
    else:
        names = []
        for entry in targets:
            found = [name for name in candidates if matches_name(name, [entry])]
            if not found:
                leaves = sorted({name.rsplit('.', 1)[-1] for name in candidates} | set(candidates))
                raise ValueError(
                    f'target_modules entry {entry!r} matches no module of {type(root).__name__}. '
                    f'Did you mean one of {closest_names(entry, leaves)}?',
                )
            names += [name for name in found if name not in names]
        names = [name for name in candidates if name in set(names)]  # model order
    if config.layers_to_transform is not None:
        layers = config.layers_to_transform
        wanted = {layers} if isinstance(layers, int) else set(layers)
        names = [name for name in names if _layer_index(name, config.layers_pattern) in wanted]
        if not names:
            raise ValueError(
                f'layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) leaves '
                f'no target: no matched module is inside a block with one of those indices.',
            )
    return [name for name in names if not matches_name(name, saved)]


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


def plan_injection(root: nn.Module, config: LoRAConfig) -> InjectionPlan:
    """Decide what :func:`inject` will do, raising on any problem before anything changes.

    Modules that are already adapters with exactly the planned configuration are left out of the plan (applying
    twice is applying once).
    """
    candidates = _candidate_modules(root)
    _check_has_adaptable_modules(root, candidates)
    saved: list[str] = []
    for entry in config.modules_to_save or []:
        found = [name for name in candidates if matches_name(name, [entry])]
        if not found:
            raise ValueError(
                f'modules_to_save entry {entry!r} matches no module of {type(root).__name__}. Did you mean one of '
                f'{closest_names(entry, sorted(candidates))}?',
            )
        saved += [name for name in found if name not in saved and not any(name.startswith(s + '.') for s in saved)]
    targets = []
    for name in _resolve_targets(root, config, candidates):
        module = candidates[name]
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
