"""Adapters on disk in PEFT's format, and the merged model as a plain Hugging Face checkpoint.

PEFT's format is a directory with ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors``
whose keys are ``base_model.model.<module>.<tensor>``:

==========================  =======================================  ==========================================
our parameter               PEFT key (Linear, Conv1D, Conv)           PEFT key (Embedding)
==========================  =======================================  ==========================================
``<module>.lora_A``         ``<module>.lora_A.weight``                ``<module>.lora_embedding_A``
``<module>.lora_B``         ``<module>.lora_B.weight``                ``<module>.lora_embedding_B``
``<module>.lora_magnitude`` ``<module>.lora_magnitude_vector``        ``<module>.lora_magnitude_vector``
==========================  =======================================  ==========================================

Other trained tensors (``modules_to_save``, biases) keep their names (``classifier.weight``,
``<module>.base_layer.bias``), as PEFT writes them. ``peft.PeftModel.from_pretrained(base, directory)`` loads what
:func:`save_adapter` writes, and :func:`load_adapter` loads what PEFT's ``save_pretrained`` writes.

Per-slice fused adapters (``enable_slices``) cannot be written in PEFT's format; for them :func:`save_adapter`
writes our own format: ``thaw_lora_config.json`` (``{"format": "composer-thaw-lora", "version": 1, "config":
<LoRAConfig fields>, "adapted_modules": [...]}``) and ``adapter_model.safetensors`` with our parameter names
(``<module>.lora_A``, ``<module>.lora_B``, ...), no prefix. ``lora_A`` stacks the enabled slices' ``A_i``
(``(n_enabled * r, in)``) and ``lora_B`` their ``B_i`` (``(n_enabled * out / n_slices, r)``).

PiSSA: training changes the base weights (they hold the residual). By default :func:`save_adapter` rewrites a PiSSA
adapter for the original, unmodified base, as PEFT's ``path_initial_model_for_weight_conversion`` does: rank ``2r``
with ``A' = [A; A0]``, ``B' = [B, -B0]`` (``A0``, ``B0`` the initial adapter), so ``base + adapter'`` equals
``residual + adapter``.

Why one module: PEFT's key names and config fields are one format; writing and reading them must change
together.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from composer.utils import dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from composer_thaw.core.types import Optimizers
from composer_thaw.lora_inject.config import LoRAConfig
from composer_thaw.lora_inject.injection import adapter_layers, saved_module_names, selectable_modules
from composer_thaw.lora_inject.layers import LoRAEmbedding, LoRALayer, is_conv1d_transposed
from composer_thaw.lora_inject.matching import is_saved, matches_name_list, matches_target_modules
from composer_thaw.lora_inject.surgery import (
    LoRASummary,
    apply_lora,
    lora_config_of,
    trainable_parameter_names,
)
from composer_thaw.utils.atomic_files import atomic_directory
from composer_thaw.utils.master_weights import MasterWeights
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.sharding import full_tensor

__all__ = [
    'ADAPTER_CONFIG_NAME',
    'ADAPTER_WEIGHTS_NAME',
    'THAW_CONFIG_NAME',
    'adapter_state_dict',
    'config_from_peft',
    'export_merged',
    'exported_target_modules',
    'expose_merged_state_dict',
    'load_adapter',
    'load_adapter_state_dict',
    'merge_into_state_dict',
    'merged_state_dict',
    'merged_state_dict_view',
    'peft_config_dict',
    'save_adapter',
]

ADAPTER_CONFIG_NAME = 'adapter_config.json'
ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'
THAW_CONFIG_NAME = 'thaw_lora_config.json'
THAW_FORMAT = 'composer-thaw-lora'
PEFT_PREFIX = 'base_model.model.'

# PEFT LoraConfig fields this package cannot honour when loading; loading refuses adapters that set them.
_UNSUPPORTED_PEFT_FIELDS = {
    'layer_replication': None,
    'lora_bias': False,
    'trainable_token_indices': None,
    'use_qalora': False,
    'target_parameters': None,
}


def _peft_names(layer: LoRALayer) -> dict[str, str]:
    """Our attribute name -> PEFT's key suffix for ``layer``'s adapter tensors."""
    if isinstance(layer, LoRAEmbedding):
        names = {'lora_A': 'lora_embedding_A', 'lora_B': 'lora_embedding_B'}
    else:
        names = {'lora_A': 'lora_A.weight', 'lora_B': 'lora_B.weight'}
    if layer.use_dora:
        names['lora_magnitude'] = 'lora_magnitude_vector'
    return names


def _is_sliced(layers: dict[str, LoRALayer]) -> bool:
    return any(getattr(layer, 'enabled_slices', None) is not None for layer in layers.values())


def _is_pissa(layer: LoRALayer) -> bool:
    return hasattr(layer, 'pissa_initial_A')


def _adapted_root(model: nn.Module) -> tuple[nn.Module, LoRAConfig, dict[str, LoRALayer]]:
    root = user_module(model)
    config = lora_config_of(root)
    layers = adapter_layers(root)
    if config is None or not layers:
        raise ValueError(f'{type(root).__name__} has no LoRA adapters: apply_lora (or LoRAInject) first.')
    return root, config, layers


def _adapter_tensor(param: torch.Tensor, masters: Optional[MasterWeights]) -> torch.Tensor:
    """The whole of an adapter tensor: from its fp32 master when it has one (a bf16 adapter under FSDP2), as PEFT
    holds adapters in fp32 on a half-precision base."""
    master = masters.master_of(param) if masters is not None else None
    return full_tensor((master if master is not None else param).detach())


def adapter_state_dict(
    model: nn.Module, convert_pissa: bool = True, masters: Optional[MasterWeights] = None
) -> dict[str, torch.Tensor]:
    """The trained tensors under PEFT's key names (``base_model.model.`` prefix included), detached copies.

    Of a sharded (FSDP2) model the whole tensors, gathered from every rank: call it on every rank. With ``masters``
    (``master_weights='fp32'``) an adapter that has an fp32 master is written from it; other tensors (the
    ``modules_to_save``) in the model's dtype, as PEFT writes them.
    """
    root, config, layers = _adapted_root(model)
    if _is_sliced(layers):
        raise ValueError(
            'Per-slice adapters (enable_slices) have no PEFT representation; use save_adapter, which '
            f'writes them in the {THAW_FORMAT} format.'
        )
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors = {attr: _adapter_tensor(getattr(layer, attr), masters) for attr in _peft_names(layer)}
        if convert_pissa and _is_pissa(layer):
            tensors['lora_A'] = torch.cat([tensors['lora_A'], layer.pissa_initial_A], dim=0)
            tensors['lora_B'] = torch.cat([tensors['lora_B'], -layer.pissa_initial_B], dim=1)
        for attr, suffix in _peft_names(layer).items():
            state[f'{PEFT_PREFIX}{name}.{suffix}'] = tensors[attr].clone().contiguous()
    named = dict(root.named_parameters())
    for name in trainable_parameter_names(root, config):
        owner, _, leaf = name.rpartition('.')
        if owner in layers and leaf in layers[owner].adapter_parameters():
            continue
        state[PEFT_PREFIX + name] = full_tensor(named[name].detach()).clone().contiguous()
    return state


def exported_target_modules(root: nn.Module, adapted: list[str]) -> Union[list[str], str]:
    """``target_modules`` for ``adapter_config.json``: the adapted modules' full names, which PEFT's list rule
    (name equal to an entry, or ending with ``'.' + entry``) maps back to exactly those modules; when it would also
    pick another module (``'fc'`` adapted at the top level, ``'block.fc'`` not), a regex matching just these names.

    Example:
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> exported_target_modules(tiny_decoder(num_layers=2).model, ['model.layers.0.self_attn.q_proj'])
        ['model.layers.0.self_attn.q_proj']
    """
    picked = [name for name in selectable_modules(root) if matches_target_modules(name, adapted)]
    if sorted(picked) == sorted(adapted):
        return adapted
    return '(?:' + '|'.join(re.escape(name) for name in adapted) + ')'


def peft_config_dict(
    model: nn.Module, base_model_name_or_path: Optional[str] = None, convert_pissa: bool = True
) -> dict[str, Any]:
    """The ``adapter_config.json`` content: a PEFT ``LoraConfig`` naming exactly the adapted modules."""
    root, config, layers = _adapted_root(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, 'config', None), '_name_or_path', None) or None
    r, alpha = config.r, config.lora_alpha
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    if convert_pissa and any(_is_pissa(layer) for layer in layers.values()):
        # rank doubles; alpha grows so that the scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is unchanged
        grow = math.sqrt(2) if config.use_rslora else 2
        r, alpha = 2 * r, alpha * grow
        rank_pattern = {key: 2 * value for key, value in rank_pattern.items()}
        alpha_pattern = {key: value * grow for key, value in alpha_pattern.items()}
    saved = saved_module_names(root, config)
    return {
        'peft_type': 'LORA',
        'task_type': config.task_type,
        'base_model_name_or_path': base_model_name_or_path,
        'revision': None,
        'inference_mode': True,
        'r': r,
        'lora_alpha': alpha,
        'target_modules': exported_target_modules(root, sorted(layers)),
        'exclude_modules': None,
        'lora_dropout': config.lora_dropout,
        'fan_in_fan_out': any(is_conv1d_transposed(layer.base_layer) for layer in layers.values()),
        'bias': config.bias,
        'use_rslora': config.use_rslora,
        'use_dora': config.use_dora,
        'modules_to_save': saved or None,
        'init_lora_weights': True,
        'layers_to_transform': None,
        'layers_pattern': None,
        'rank_pattern': rank_pattern,
        'alpha_pattern': alpha_pattern,
    }


def save_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    base_model_name_or_path: Optional[str] = None,
    convert_pissa: bool = True,
    masters: Optional[MasterWeights] = None,
) -> Path:
    """Write the adapter to ``directory`` in PEFT's format (our own format for per-slice adapters).

    Under several processes rank 0 writes; a sharded (FSDP2) model's tensors are gathered from every rank, so then
    call it on every rank.

    Args:
        model: a model adapted by :func:`apply_lora` / ``LoRAInject``.
        directory: created if missing.
        base_model_name_or_path: recorded in ``adapter_config.json`` (default: the model config's ``_name_or_path``).
        convert_pissa: write a PiSSA adapter for the original base (see the module docstring); ``False`` writes it
            for the residual base as it is in memory.
        masters: the optimizer's fp32 masters (``master_weights='fp32'``): adapters that have one are written from
            it (see :func:`adapter_state_dict`).
    """
    from safetensors.torch import save_file

    root, config, layers = _adapted_root(model)
    directory = Path(directory)
    if _is_sliced(layers):
        named = dict(root.named_parameters())
        state = {
            name: full_tensor(named[name].detach()).clone().contiguous()
            for name in trainable_parameter_names(root, config)
        }
        meta = {'format': THAW_FORMAT, 'version': 1, 'config': config.to_dict(), 'adapted_modules': sorted(layers)}
        config_name = THAW_CONFIG_NAME
    else:
        state = adapter_state_dict(root, convert_pissa=convert_pissa, masters=masters)
        meta = peft_config_dict(root, base_model_name_or_path, convert_pissa=convert_pissa)
        config_name = ADAPTER_CONFIG_NAME
    if dist.get_global_rank() == 0:
        with atomic_directory(directory) as staging:  # a kill while writing leaves no half-written adapter
            (staging / config_name).write_text(json.dumps(meta, indent=2, sort_keys=True))
            save_file(
                {k: v.cpu() for k, v in state.items()}, str(staging / ADAPTER_WEIGHTS_NAME), metadata={'format': 'pt'}
            )
    return directory


def config_from_peft(peft_config: dict[str, Any], root: Optional[nn.Module] = None) -> LoRAConfig:
    """Our :class:`LoRAConfig` for a PEFT ``adapter_config.json`` (as a dict).

    With ``root``, list entries of ``target_modules`` and ``modules_to_save`` that match no module of ``root`` are
    dropped, as PEFT ignores them (PEFT adds ``'classifier'`` and ``'score'`` for every sequence classifier).

    Raises:
        ValueError: for a non-LoRA adapter or LoRA options this package does not implement.
    """
    if peft_config.get('peft_type', 'LORA') != 'LORA':
        raise ValueError(f'The adapter is a {peft_config.get("peft_type")!r} adapter; only LoRA adapters load.')
    for key, default in _UNSUPPORTED_PEFT_FIELDS.items():
        value = peft_config.get(key, default)
        if value not in (default, [], {}, None, False):
            raise ValueError(f'The adapter sets {key}={value!r}, which LoRAInject does not implement.')
    init = peft_config.get('init_lora_weights', True)
    if isinstance(init, str) and init not in ('gaussian',):
        raise ValueError(
            f'The adapter was initialised with init_lora_weights={init!r}: its base weights were changed, so it only '
            'fits the modified base. Save it from PEFT with `path_initial_model_for_weight_conversion` to get an '
            'adapter for the original base.',
        )
    targets = peft_config.get('target_modules')
    if isinstance(targets, (set, tuple)):
        targets = list(targets)
    saved = peft_config.get('modules_to_save')
    if root is not None:
        names = list(selectable_modules(root))
        if saved:
            saved = [entry for entry in saved if any(is_saved(name, [entry]) for name in names)] or None
        if isinstance(targets, list):  # PEFT ignores entries that match nothing as long as one matches
            targets = [entry for entry in targets if any(matches_name_list(name, [entry]) for name in names)] or targets
    layers = peft_config.get('layers_to_transform')
    return LoRAConfig(
        r=peft_config.get('r', 8),
        lora_alpha=peft_config.get('lora_alpha', 8),
        target_modules=targets,
        exclude_modules=peft_config.get('exclude_modules'),
        layers_to_transform=layers if layers not in ([], None) else None,
        layers_pattern=peft_config.get('layers_pattern') if layers not in ([], None) else None,
        rank_pattern=dict(peft_config.get('rank_pattern') or {}),
        alpha_pattern=dict(peft_config.get('alpha_pattern') or {}),
        lora_dropout=peft_config.get('lora_dropout', 0.0),
        use_rslora=bool(peft_config.get('use_rslora', False)),
        use_dora=bool(peft_config.get('use_dora', False)),
        init='gaussian' if init == 'gaussian' else 'kaiming',
        bias=peft_config.get('bias', 'none'),
        modules_to_save=saved,
        task_type=peft_config.get('task_type'),
    )


def _our_name(key: str, layers: dict[str, LoRALayer]) -> str:
    """Our parameter name for a PEFT key (prefix already removed)."""
    for name, layer in layers.items():
        if key.startswith(name + '.'):
            suffix = key[len(name) + 1 :]
            for attr, peft_suffix in _peft_names(layer).items():
                if suffix == peft_suffix:
                    return f'{name}.{attr}'
    if '.original_module.' in key:
        return ''  # PEFT's frozen copy of a module to save: nothing to load
    return key.replace('.modules_to_save.', '.')


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], peft_keys: bool = True) -> None:
    """Copy adapter tensors (PEFT's keys, or ours with ``peft_keys=False``) into an adapted model.

    Every adapter tensor of the model must be present and every tensor must fit: a shape that differs (an adapter
    trained on another base, or with another rank) raises before anything is copied.
    """
    root, _, layers = _adapted_root(model)
    named = dict(root.named_parameters())
    assignments: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, tensor in state.items():
        if peft_keys:
            key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
            name = _our_name(key, layers)
            if not name:
                continue
        else:
            name = key
        if name not in named:
            unexpected.append(key)
        elif named[name].shape != tensor.shape:
            mismatched.append(f'{name}: adapter {tuple(tensor.shape)}, model {tuple(named[name].shape)}')
        else:
            assignments[name] = tensor
    expected = [f'{name}.{attr}' for name, layer in layers.items() for attr in layer.adapter_parameters()]
    missing = [name for name in expected if name not in assignments]
    problems = []
    if mismatched:
        problems.append(
            'shapes differ (was the adapter trained on another base model or with another rank?): '
            + '; '.join(mismatched)
        )
    if unexpected:
        problems.append(f'tensors for parameters the model does not have: {unexpected[:10]}')
    if missing:
        problems.append(f'adapter tensors missing from the file: {missing[:10]}')
    if problems:
        raise ValueError(f'Cannot load the adapter into {type(root).__name__}: ' + ' | '.join(problems))
    with torch.no_grad():
        for name, tensor in assignments.items():
            named[name].copy_(tensor.to(named[name].dtype))


def load_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    optimizers: Optional[Optimizers] = None,
) -> LoRASummary:
    """Adapt ``model`` as the adapter in ``directory`` says and load its tensors (PEFT's format or ours).

    The model must be the plain base (or already adapted with the same configuration). ``optimizers``, if given,
    are updated as in :func:`apply_lora`.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    root = user_module(model)
    if (directory / THAW_CONFIG_NAME).exists():
        meta = json.loads((directory / THAW_CONFIG_NAME).read_text())
        if meta.get('format') != THAW_FORMAT or meta.get('version') != 1:
            raise ValueError(f'{directory / THAW_CONFIG_NAME} is not a {THAW_FORMAT} version 1 file.')
        config, peft_keys = LoRAConfig(**meta['config']), False
    elif (directory / ADAPTER_CONFIG_NAME).exists():
        config, peft_keys = config_from_peft(json.loads((directory / ADAPTER_CONFIG_NAME).read_text()), root), True
    else:
        raise FileNotFoundError(f'{directory} has neither {ADAPTER_CONFIG_NAME} nor {THAW_CONFIG_NAME}.')
    weights = directory / ADAPTER_WEIGHTS_NAME
    if weights.exists():
        state = load_file(str(weights))
    elif (directory / 'adapter_model.bin').exists():
        state = torch.load(directory / 'adapter_model.bin', map_location='cpu', weights_only=True)
    else:
        raise FileNotFoundError(f'{directory} has no {ADAPTER_WEIGHTS_NAME}.')
    summary = apply_lora(model, optimizers, config)
    load_adapter_state_dict(model, state, peft_keys=peft_keys)
    return summary


def merge_into_state_dict(root: nn.Module, state: dict[str, Any], prefix: str = '') -> None:
    """Turn ``state``, the state dict of the adapted ``root`` (keys under ``prefix``), into the merged plain model's,
    in place: each adapter layer's base tensors move back to the base module's own names (``q_proj.weight``, not
    ``q_proj.base_layer.weight``) with the adapter folded into the weight, and the adapter tensors are dropped.

    Merged weights are new tensors (sharded like the base weight under FSDP2); ``root`` is not changed. Keys already
    plain are left alone, so applying it twice changes nothing.

    Example:
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> model = tiny_decoder(num_layers=1).model
        >>> _ = apply_lora(model, r=8, target_modules=['q_proj'])
        >>> state = model.state_dict()
        >>> merge_into_state_dict(model, state)
        >>> type(model)(model.config).load_state_dict(state)  # a plain model of the same class: strict
        <All keys matched successfully>
    """
    layers = adapter_layers(root)
    renamed: dict[str, Any] = {}
    for key, value in state.items():
        name, rest = _adapter_layer_of(key[len(prefix) :], layers) if key.startswith(prefix) else ('', '')
        attribute, _, leaf = rest.partition('.')
        if not name or attribute not in _own_names(layers[name]):  # not an adapter layer's, or already plain
            renamed[key] = value
        elif attribute == 'base_layer':
            layer = layers[name]
            # from the layer, not from `value` (which another hook may have replaced): the same collectives on
            # every rank under FSDP2
            merge = leaf == 'weight' and not layer.merged
            renamed[f'{prefix}{name}.{leaf}'] = layer.merged_weight().detach() if merge else value
    state.clear()
    state.update(renamed)
    metadata = getattr(state, '_metadata', None)
    if metadata is not None:  # module versions, read by load_state_dict: the base module's, under its own name
        for name in layers:
            base = metadata.pop(f'{prefix}{name}.base_layer', None)
            for key in [k for k in metadata if k == f'{prefix}{name}' or k.startswith(f'{prefix}{name}.')]:
                del metadata[key]
            if base is not None:
                metadata[f'{prefix}{name}'] = base


def _own_names(layer: LoRALayer) -> set[str]:
    """The layer's own parameters, buffers and submodules (``base_layer``, ``lora_A``, ``lora_dropout``...)."""
    return {*layer._parameters, *layer._buffers, *layer._modules}


def _adapter_layer_of(key: str, layers: dict[str, LoRALayer]) -> tuple[str, str]:
    """``(layer name, rest of the key)`` when ``key`` belongs to an adapter layer, else ``('', '')``."""
    owner = key
    while '.' in owner:
        owner = owner.rpartition('.')[0]
        if owner in layers:
            return owner, key[len(owner) + 1 :]
    return '', ''


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted model's weights with every adapter merged in, under the base model's own names.

    The model is not changed (merged weights are new tensors). Of a sharded (FSDP2) model the whole tensors,
    gathered from every rank: call it on every rank.
    """
    root, _, _ = _adapted_root(model)
    state = root.state_dict()
    merge_into_state_dict(root, state)
    return {key: full_tensor(value.detach()) for key, value in state.items()}


def _merged_view_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook of :func:`expose_merged_state_dict`: merge when the state dict is the module's own."""
    if not prefix:
        merge_into_state_dict(module, state)


def expose_merged_state_dict(model: nn.Module) -> RemovableHandle:
    """Make the state dict of the adapted model itself the merged plain model's, as Hugging Face code expects,
    until the returned handle is removed (:func:`merged_state_dict_view` does both around a block).

    Meanwhile ``root.state_dict()`` (``root = user_module(model)``: the Hugging Face model) has the base model's own
    keys with every adapter merged in, so ``save_pretrained`` and llm-foundry's ``hf_checkpointer`` (which loads it
    strictly into ``type(root)(config)``) write a plain Hugging Face model that computes what the adapted one does.
    The state dict of any module that contains ``root`` (Composer's model, DDP: what checkpoints hold) keeps the
    adapters, so a resumed run continues exactly. Do not load ``root.state_dict()`` back into the adapted ``root``
    while it is exposed (the merged weights would become the base, under the trained adapters).

    Example:
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> hf_model = tiny_decoder(num_layers=1).model
        >>> _ = apply_lora(hf_model, r=8, target_modules=['q_proj', 'v_proj'])
        >>> handle = expose_merged_state_dict(hf_model)
        >>> plain = type(hf_model)(hf_model.config)
        >>> plain.load_state_dict(hf_model.state_dict())  # strict
        <All keys matched successfully>
        >>> ids = torch.tensor([[101, 2023, 102]])
        >>> torch.allclose(plain(ids).logits, hf_model(ids).logits)  # plain computes what hf_model computes
        True
        >>> handle.remove()  # hf_model.state_dict() holds the adapters again
        >>> sum('lora_A' in key for key in hf_model.state_dict())
        2
    """
    root, _, _ = _adapted_root(model)
    if any(hook is _merged_view_hook for hook in root._state_dict_hooks.values()):
        return RemovableHandle(
            OrderedDict()
        )  # exposed already (an enclosing view): removing this one leaves that in place
    return root.register_state_dict_post_hook(_merged_view_hook)


@contextmanager
def merged_state_dict_view(model: nn.Module) -> Iterator[nn.Module]:
    """While the block runs, the adapted Hugging Face model's own ``state_dict()`` is the merged plain model's
    (:func:`expose_merged_state_dict`); afterwards it holds the adapters again. Yields that Hugging Face model.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> model = tiny_decoder(num_layers=1)  # Composer's model, or the Hugging Face one
        >>> _ = apply_lora(model, r=8, target_modules=['q_proj'])
        >>> with merged_state_dict_view(model) as hf_model:
        ...     hf_model.save_pretrained('out/merged')  # a plain Hugging Face folder
        >>> type(AutoModelForCausalLM.from_pretrained('out/merged')).__name__
        'LlamaForCausalLM'
    """
    handle = expose_merged_state_dict(model)
    try:
        yield user_module(model)
    finally:
        handle.remove()


def export_merged(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the merged model as a plain Hugging Face checkpoint (``save_pretrained`` layout) to ``directory``.

    The model in memory is not changed. Load the result with ``AutoModel*.from_pretrained(directory)``. Under
    several processes rank 0 writes; a sharded (FSDP2) model's tensors are gathered from every rank, so then call it
    on every rank.
    """
    root, _, _ = _adapted_root(model)
    save_pretrained = getattr(root, 'save_pretrained', None)
    if save_pretrained is None:
        raise TypeError(f'{type(root).__name__} has no save_pretrained: export_merged needs a Hugging Face model.')
    directory = Path(directory)
    state = merged_state_dict(root)
    if dist.get_global_rank() == 0:
        with atomic_directory(directory) as staging:  # a kill while writing leaves no half-written model
            save_pretrained(str(staging), state_dict=state, safe_serialization=True)
    return directory
