"""Select parameters by name and discover a model's repeated blocks.

Every algorithm in this package names parameters the same way: relative to the user's own model,
not to Composer's wrappers. A :class:`composer.models.HuggingFaceModel` holds the Hugging Face model
under ``.model`` and DDP adds ``module.``; patterns such as ``lm_head`` or ``model.layers.3`` are
matched against the names the user sees in ``hf_model.named_parameters()``.

Example:
    >>> root = user_module(composer_model)
    >>> units = split_into_units(root)
    >>> [u.name for u in units][:2]
    ['bert.embeddings', 'bert.encoder.layer.0']
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    'ModelUnit',
    'RepeatedBlocks',
    'closest_names',
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


def closest_names(query: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Names most similar to ``query``, for 'did you mean' error messages."""
    names = list(names)
    close = difflib.get_close_matches(query, names, n=n, cutoff=0.4)
    if len(close) < n:
        stripped = query.strip('^$.*\\[]()')
        close += [name for name in names if stripped and stripped in name and name not in close][: n - len(close)]
    return close or names[:n]


@dataclass(frozen=True)
class RepeatedBlocks:
    """The container of a model's repeated blocks, e.g. ``bert.encoder.layer`` with 6 blocks."""

    container: str
    block_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.block_names)


def find_repeated_blocks(model: nn.Module) -> RepeatedBlocks | None:
    """Find the ``ModuleList``/``Sequential`` of same-type children holding the most parameters.

    Returns ``None`` when the model has no container of at least two same-typed children with parameters.
    """
    best: tuple[int, RepeatedBlocks] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(child) for _, child in children}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel == 0:
            continue
        prefix = f'{name}.' if name else ''
        blocks = RepeatedBlocks(container=name, block_names=tuple(prefix + child for child, _ in children))
        if best is None or numel > best[0]:
            best = (numel, blocks)
    return None if best is None else best[1]


UnitKind = Literal['embedding', 'block', 'other']


@dataclass(frozen=True)
class ModelUnit:
    """A unit of a model for freezing or rotation: the embeddings, one block, or one trailing module."""

    name: str
    kind: UnitKind
    parameter_names: tuple[str, ...]

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = named_parameters(model)
        return [params[name] for name in self.parameter_names]

    def numel(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.parameters(model))


def _common_module(names: list[str]) -> str:
    split = [name.split('.')[:-1] for name in names]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return '.'.join(common)


def _unit_after_blocks(param_name: str, container: str) -> str:
    """Name of the trailing unit that owns ``param_name``: its path down to where it leaves ``container``."""
    parts = param_name.split('.')
    container_parts = container.split('.') if container else []
    for depth, part in enumerate(parts[:-1]):
        if depth >= len(container_parts) or part != container_parts[depth]:
            return '.'.join(parts[: depth + 1])
    return '.'.join(parts[:-1]) or param_name


def split_into_units(model: nn.Module) -> list[ModelUnit]:
    """Split ``model`` into HiFT-style units: embeddings first, then each block, then trailing modules.

    Everything registered before the first block forms one ``embedding`` unit (GPT-2's ``wte`` and
    ``wpe`` together); each repeated block is a ``block`` unit; each module after the blocks
    (final norm, pooler, classifier, ``lm_head``) is its own ``other`` unit, in registration order.
    Tied parameters belong to the unit that registers them first.

    Raises:
        ValueError: if the model has no repeated blocks.
    """
    blocks = find_repeated_blocks(model)
    if blocks is None:
        raise ValueError(
            f'No repeated blocks found in {type(model).__name__}: no nn.ModuleList or nn.Sequential holds two or '
            'more children of one type with parameters. Name the groups explicitly with regexes instead.',
        )
    block_of: dict[str, list[str]] = {}
    for block in blocks.block_names:
        block_of[block] = []
    before: list[str] = []
    after: dict[str, list[str]] = {}
    seen_block = False
    for name in named_parameters(model):
        owner = next((b for b in blocks.block_names if name.startswith(b + '.')), None)
        if owner is not None:
            block_of[owner].append(name)
            seen_block = True
        elif not seen_block:
            before.append(name)
        else:
            after.setdefault(_unit_after_blocks(name, blocks.container), []).append(name)
    units: list[ModelUnit] = []
    if before:
        units.append(ModelUnit(_common_module(before) or 'embeddings', 'embedding', tuple(before)))
    units += [ModelUnit(block, 'block', tuple(names)) for block, names in block_of.items() if names]
    units += [ModelUnit(unit, 'other', tuple(names)) for unit, names in after.items()]
    return units


def numel(params: Iterable[torch.Tensor]) -> int:
    """Total number of elements in ``params``."""
    return sum(p.numel() for p in params)
