"""Select parameters by name and discover a model's repeated blocks and units, in the order they run.

Every algorithm in this package names parameters the same way: relative to the user's own model,
not to Composer's wrappers. A :class:`composer.models.HuggingFaceModel` holds the Hugging Face model
under ``.model`` and DDP adds ``module.``; patterns such as ``lm_head`` or ``model.layers.3`` are
matched against the names the user sees in ``hf_model.named_parameters()``.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> composer_model = tiny_decoder(num_layers=2)
    >>> root = user_module(composer_model)  # the Hugging Face model inside Composer's wrapper
    >>> type(root).__name__, list(named_parameters(root))[:2]
    ('LlamaForCausalLM', ['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight'])
    >>> [u.name for u in split_into_units(root)]
    ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.norm', 'lm_head']
"""

from __future__ import annotations

import contextvars
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from composer_thaw.utils.execution_order import ForwardTrace, ForwardTraceError, trace_forward

__all__ = [
    'ModelUnit',
    'RepeatedBlocks',
    'find_block_stacks',
    'find_repeated_blocks',
    'named_parameters',
    'numel',
    'parameter_aliases',
    'split_into_units',
    'user_module',
]


def user_module(model: nn.Module) -> nn.Module:
    """The module whose parameter names the user writes patterns against.

    Unwraps DDP (``.module``) and Composer's model wrappers (``HuggingFaceModel.model``,
    ``ComposerClassifier.module``); any other module is returned unchanged.
    """
    from composer.models import ComposerModel

    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, ComposerModel):
            inner = getattr(model, 'model', None)
            if not isinstance(inner, nn.Module):
                inner = getattr(model, 'module', None)
            if not isinstance(inner, nn.Module):
                return model
            owned = {id(p) for p in inner.parameters()}
            if any(id(p) not in owned for p in model.parameters()):
                return model  # the wrapper has parameters of its own: keep its names
            model = inner
        else:
            return model


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Each distinct parameter once (tied weights under their first name), in registration order."""
    return dict(model.named_parameters())


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Map each parameter's canonical name to every name it is reachable under (tied weights)."""
    canonical: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(param), name)
        aliases.setdefault(first, []).append(name)
    return aliases


@dataclass(frozen=True)
class RepeatedBlocks:
    """The container of a model's repeated blocks, e.g. ``bert.encoder.layer`` with 6 blocks."""

    container: str
    block_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.block_names)


def find_block_stacks(model: nn.Module) -> list[RepeatedBlocks]:
    """Every stack of repeated blocks: each outermost ``ModuleList``/``Sequential`` of two or more same-typed children
    holding parameters, in registration order.

    An encoder-decoder has two (``encoder.block``, ``decoder.block``), a ResNet four (``layer1`` ... ``layer4``);
    stacks inside a block (a mixture of experts' ``experts``) belong to that block and are not listed.
    """
    stacks: list[RepeatedBlocks] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        if any(_within(name, stack.container) for stack in stacks):
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        if next(module.parameters(), None) is None:
            continue
        prefix = f'{name}.' if name else ''
        stacks.append(RepeatedBlocks(container=name, block_names=tuple(prefix + child for child, _ in children)))
    return stacks


def find_repeated_blocks(model: nn.Module) -> RepeatedBlocks | None:
    """The stack of repeated blocks holding the most parameters (see :func:`find_block_stacks`), or ``None``."""
    stacks = find_block_stacks(model)
    if not stacks:
        return None
    return max(stacks, key=lambda stack: numel(model.get_submodule(stack.container).parameters()))


UnitKind = Literal['embedding', 'block', 'other']


@dataclass(frozen=True)
class ModelUnit:
    """A unit of a model for freezing or rotation: the embeddings, one block, or one module between or after stacks.

    ``parameter_names`` are canonical names (each parameter once, in the first unit to run among those using it);
    ``aliases`` are every name under which this unit's own modules reach a parameter, tied weights included.
    """

    name: str
    kind: UnitKind
    parameter_names: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = named_parameters(model)
        return [params[name] for name in self.parameter_names]

    def numel(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.parameters(model))


def _within(path: str, ancestor: str) -> bool:
    """Whether module path ``path`` is ``ancestor`` or lies inside it (``''``, the root, contains everything)."""
    return not ancestor or path == ancestor or path.startswith(ancestor + '.')


def _region(alias: str, stacks: Sequence[RepeatedBlocks]) -> tuple[str, bool]:
    """The block a parameter name lies in (and ``True``), or else the outermost module or parameter on its path
    that holds no stack (and ``False``): ``model.norm`` for ``model.norm.weight`` next to ``model.layers``."""
    for stack in stacks:
        for block in stack.block_names:
            if _within(alias, block):
                return block, True
    parts = alias.split('.')
    for depth in range(1, len(parts)):
        prefix = '.'.join(parts[:depth])
        if not any(_within(stack.container, prefix) for stack in stacks):
            return prefix, False
    return alias, False  # a parameter of a module holding a stack (a ViT's class_token)


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None  # the path of a parameter


_TRACES: OrderedDict[tuple, Optional[ForwardTrace]] = OrderedDict()  # the last few models' traces, by structure
_TRACES_KEPT = 8


def _structure(model: nn.Module) -> tuple:
    """What the order of a forward depends on: the model's class and configuration, its parameters' names, shapes,
    dtypes and ties. A copy of a model (or the model sharded by FSDP2, whose class gets an ``FSDP`` prefix) has the
    same structure, so its trace is reused."""
    config = getattr(model, 'config', None)
    to_dict = getattr(config, 'to_dict', None)
    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith('FSDP'))
    return (
        f'{cls.__module__}.{cls.__qualname__}',
        repr(to_dict()) if callable(to_dict) else None,
        tuple((name, tuple(p.shape), p.dtype) for name, p in model.named_parameters(remove_duplicate=False)),
        tuple(tuple(aliases) for aliases in parameter_aliases(model).values() if len(aliases) > 1),
    )


_TRACE_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar('thaw_trace_forward', default=True)


@contextmanager
def units_in_registration_order() -> Iterator[None]:
    """Within it, units follow the order modules are registered in, without tracing a forward: for models too large
    to run even on stand-in weights (the memory estimator's multi-billion-parameter meta models).

    Example:
        >>> from composer_thaw.models.specs import load_model_config, meta_model
        >>> meta_llama_8b = meta_model(load_model_config('llama-3-8b'))
        >>> with units_in_registration_order():
        ...     units = split_into_units(meta_llama_8b)
        >>> len(units), units[1].name
        (35, 'model.layers.0')
    """
    token = _TRACE_FORWARD.set(False)
    try:
        yield
    finally:
        _TRACE_FORWARD.reset(token)


def _forward_trace(model: nn.Module) -> Optional[ForwardTrace]:
    """The model's traced forward (reused for a model of the same structure); ``None``, with a warning, if it fails."""
    if not _TRACE_FORWARD.get():
        return None
    key = _structure(model)
    if key in _TRACES:
        _TRACES.move_to_end(key)
        return _TRACES[key]
    trace: Optional[ForwardTrace]
    try:
        trace = trace_forward(model)
    except ForwardTraceError as error:
        warnings.warn(
            f'Could not trace a forward of {type(model).__name__} to find the order its modules run in ({error}). '
            'Its units follow the order its modules are registered in, which can differ from the order they run '
            '(a final norm registered before the blocks joins the embeddings). Check them with rotation_preview, or '
            "name them yourself: HiFTRotation(groups=[...]) or LayerFreezing(granularity='leaf').",
            stacklevel=3,
        )
        trace = None
    _TRACES[key] = trace
    while len(_TRACES) > _TRACES_KEPT:
        _TRACES.popitem(last=False)
    return trace


def _region_times(
    model: nn.Module,
    regions: dict[str, list[str]],
    is_block: dict[str, bool],
    canonical: dict[str, str],
    trace: Optional[ForwardTrace],
) -> dict[str, float]:
    """When each region first runs: its module's first call, else the first use of a parameter in it; a region
    first used while a block runs counts as running just before that block. A region the forward never reached
    (every region, without a trace) runs right after the region registered before it."""
    times: dict[str, float] = {}
    traced: set[str] = set()
    previous = -1.0
    for region, aliases in regions.items():  # registration order
        time: Optional[float] = None
        if trace is not None:
            if region in trace.module_call:
                time = trace.module_call[region]
            else:
                uses = [trace.parameter_use[canonical[a]] for a in aliases if canonical[a] in trace.parameter_use]
                time = min(uses) if uses else None
        times[region] = previous + 1e-6 if time is None else float(time)
        if time is not None:
            traced.add(region)
        previous = times[region]
    if trace is not None:  # a module first used inside a block (DeBERTa's shared rel_embeddings) runs before it
        spans = [
            (trace.module_call[region], trace.module_return[region])
            for region, block in is_block.items()
            if block and region in trace.module_return
        ]
        for region, time in times.items():
            if not is_block[region] and region in traced:
                inside = [start for start, end in spans if start < time < end]
                if inside:
                    times[region] = max(inside) - 0.5
    return times


def _leading_unit_name(model: nn.Module, regions: Sequence[str]) -> str:
    """The first unit's name: its module's path if it is one module, else ``embeddings`` or (vision) ``stem``.
    Modules that hold the same tied weights count as one, named by the path registered first (Transformers 5 gives
    T5's ``shared`` and each stack's ``embed_tokens`` one weight in three modules; 4.x, one module under three
    paths)."""
    modules = [_submodule(model, region) for region in regions]
    held = {
        region if module is None else tuple(map(id, module.parameters())) for region, module in zip(regions, modules)
    }
    if len(held) == 1:  # the path registered first, as the one module's
        registered = [path for path, _ in model.named_modules(remove_duplicate=False)]
        return min(regions, key=lambda region: registered.index(region) if region in registered else len(registered))
    embedding_like = any(
        'embed' in region.lower() or 'token' in region.lower() or isinstance(module, nn.Embedding)
        for region, module in zip(regions, modules)
    )
    return 'embeddings' if embedding_like else 'stem'


def split_into_units(model: nn.Module) -> list[ModelUnit]:
    """Split ``model`` into HiFT-style units, in the order they run in the forward pass.

    One forward on a tiny input is traced (:func:`composer_thaw.utils.execution_order.trace_forward`, on stand-in
    weights, so nothing is computed on the real ones). Every stack of repeated blocks (:func:`find_block_stacks`:
    both stacks of an encoder-decoder, each stage of a ResNet) gives one ``block`` unit per block. What runs before
    the first block forms one ``embedding`` unit: GPT-2's ``wte`` and ``wpe`` together, named ``embeddings``; a
    ResNet's ``conv1`` and ``bn1``, named ``stem``; a single module keeps its path (``model.embed_tokens``). Each
    module that runs between or after the stacks (T5's ``encoder.final_layer_norm``, OPT's final norm although it
    is registered before the blocks, a pooler, a classifier, ``lm_head``) is an ``other`` unit named by its path.
    A parameter several modules use (tied embeddings) belongs to the unit that runs first; a unit left without
    parameters of its own is dropped. Parameters keep their registration order within a unit.

    If the forward cannot be traced, units follow registration order instead, with a warning that says so.

    Raises:
        ValueError: if the model has no repeated blocks.
    """
    stacks = find_block_stacks(model)
    if not stacks:
        raise ValueError(
            f'No repeated blocks found in {type(model).__name__}: no nn.ModuleList or nn.Sequential holds two or '
            'more children of one type with parameters. Name the groups explicitly with regexes instead.',
        )
    canonical = {alias: name for name, aliases in parameter_aliases(model).items() for alias in aliases}
    regions: dict[str, list[str]] = {}
    is_block: dict[str, bool] = {}
    for alias in canonical:  # every name of every parameter, in registration order
        region, block = _region(alias, stacks)
        regions.setdefault(region, []).append(alias)
        is_block[region] = block
    times = _region_times(model, regions, is_block, canonical, _forward_trace(model))
    ordered = sorted(regions, key=lambda region: times[region])
    first_block = min(times[region] for region in regions if is_block[region])
    leading = [region for region in ordered if not is_block[region] and times[region] < first_block]
    groups: list[tuple[str, UnitKind, list[str]]] = []
    if leading:
        groups.append((_leading_unit_name(model, leading), 'embedding', leading))
    groups += [
        (region, 'block' if is_block[region] else 'other', [region]) for region in ordered if region not in leading
    ]

    owner: dict[str, int] = {}  # canonical name -> the first group to run that uses it
    for index, (_, _, members) in enumerate(groups):
        for region in members:
            for alias in regions[region]:
                owner.setdefault(canonical[alias], index)
    units = []
    registered = list(named_parameters(model))
    for index, (name, kind, members) in enumerate(groups):
        owned = tuple(param for param in registered if owner[param] == index)
        if owned:
            aliases = tuple(alias for region in members for alias in regions[region])
            units.append(ModelUnit(name, kind, owned, aliases))
    return units


def numel(params: Iterable[torch.Tensor]) -> int:
    """Total number of elements in ``params``."""
    return sum(p.numel() for p in params)
