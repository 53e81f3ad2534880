"""The units that layer freezing freezes, in order, and the parameters a frozen prefix of them releases.

A *unit* is a named group of parameter names. Two granularities:

* ``'leaf'`` (Composer's): every module that holds parameters of its own, depth-first in registration order.
  Composer only counts modules without children; a module with both its own parameters and children (a
  ``nn.MultiheadAttention``'s ``in_proj_weight``, a custom block with a gate) is a unit here too, placed
  before its children, so its parameters can be frozen as well.
* ``'block'``: the units of :func:`composer_thaw.utils.parameter_selection.split_into_units`, in the order they run
  in the forward pass: the embeddings (everything that runs before the first block), then each block
  (``model.layers.3``, ``bert.encoder.layer.3``; both stacks of an encoder-decoder, with what runs between them,
  such as T5's ``encoder.final_layer_norm``, in its place). What runs after the last block (final norm, head) is
  never frozen.

Units list every name a parameter is reachable under, so tied weights are handled in one rule: a
parameter is frozen only when **every** name it has lies in a frozen unit. An input embedding tied to the
output head therefore stays trainable while the head does.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> units = freezable_units(tiny_decoder(num_layers=4).model, 'block')
    >>> [u.name for u in units]
    ['model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.layers.2', 'model.layers.3']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from composer_thaw.utils.parameter_selection import parameter_aliases, split_into_units

__all__ = ['GRANULARITIES', 'FreezeUnit', 'Granularity', 'freezable_units', 'parameters_to_freeze']

Granularity = Literal['leaf', 'block']
GRANULARITIES: tuple[str, ...] = ('leaf', 'block')


@dataclass(frozen=True)
class FreezeUnit:
    """One freezable unit: a module name and every name of every parameter it uses (tied aliases included)."""

    name: str
    parameter_names: tuple[str, ...]


def _leaf_units(module: nn.Module, prefix: str, units: list[FreezeUnit]) -> None:
    """Composer's depth-first walk (``_get_layers``), plus units for modules with own parameters and children."""
    children = list(module.named_children())
    own = [name for name, _ in module.named_parameters(recurse=False, remove_duplicate=False)]
    if own:
        units.append(FreezeUnit(prefix or '(root)', tuple(f'{prefix}.{name}' if prefix else name for name in own)))
    for name, child in children:
        _leaf_units(child, f'{prefix}.{name}' if prefix else name, units)


def _block_units(model: nn.Module) -> list[FreezeUnit]:
    """The units up to the last block, in the order they run; each lists the names its own modules use."""
    try:
        units = split_into_units(model)
    except ValueError as error:
        raise ValueError(f"granularity='block' needs repeated blocks: {error} Or use granularity='leaf'.") from None
    last_block = max(index for index, unit in enumerate(units) if unit.kind == 'block')
    return [FreezeUnit(unit.name, unit.aliases) for unit in units[: last_block + 1]]


def freezable_units(model: nn.Module, granularity: Granularity = 'leaf') -> list[FreezeUnit]:
    """The units of ``model`` that may be frozen, in freezing order (first frozen first).

    For ``'leaf'`` this is Composer's list of leaf modules without the last one (the head is never frozen);
    for ``'block'`` the embedding unit, the blocks and what runs between them, in the order they run. Pass
    :func:`composer_thaw.utils.parameter_selection.user_module` of a Composer model so names are the Hugging Face
    model's
    own.

    Raises:
        ValueError: unknown ``granularity``, a model without repeated blocks for ``'block'``, or fewer than two
            freezable units (progressive freezing needs at least two steps).
    """
    if granularity == 'leaf':
        units: list[FreezeUnit] = []
        _leaf_units(model, '', units)
        units = units[:-1]
    elif granularity == 'block':
        units = _block_units(model)
    else:
        raise ValueError(f'granularity={granularity!r} is not supported; choose one of {list(GRANULARITIES)}.')
    if len(units) < 2:
        what = (
            'the embeddings and each repeated block'
            if granularity == 'block'
            else 'the modules holding parameters, except the last one (never frozen)'
        )
        raise ValueError(
            f'{type(model).__name__} has {len(units)} freezable unit(s) at granularity={granularity!r} '
            f'({[u.name for u in units]}); layer freezing needs at least 2. Units are {what}. '
            + ("Try granularity='leaf'." if granularity == 'block' else 'Use a model with more parameterized layers.'),
        )
    return units


def parameters_to_freeze(model: nn.Module, frozen_units: Sequence[FreezeUnit]) -> dict[str, torch.nn.Parameter]:
    """Parameters (by canonical name) all of whose names lie in ``frozen_units``: those that freezing them releases."""
    frozen_names = {name for unit in frozen_units for name in unit.parameter_names}
    params = dict(model.named_parameters())
    return {
        canonical: params[canonical]
        for canonical, aliases in parameter_aliases(model).items()
        if all(alias in frozen_names for alias in aliases)
    }
