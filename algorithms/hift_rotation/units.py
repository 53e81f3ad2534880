"""The units HiFT rotates over, found without per-model code, and which of them rotate, stay frozen or always train.

A *unit* is what the ``hift`` package calls a layer: the embeddings (unit 0), each repeated block (units 1..n),
then each module after the blocks (final norm, pooler, classifier, ``lm_head``), as the package's per-model regex
lists give them. Here they come from :func:`composer_thaw.utils.parameter_selection.split_into_units`, in the order they
run in the forward pass, so any model with a ``ModuleList``/``Sequential`` of blocks works without registration
(both stacks of an encoder-decoder, each stage of a ResNet); an explicit list of regexes (``groups``) replaces the
discovery for models without one.

Only parameters that train when the rotation starts take part (``requires_grad`` and in the optimizer): after
``LoRAInject`` that is the adapters (HiFT's ``lora_tuning`` mode). Units left without such parameters are
dropped before indices are counted, as the package does.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=4).model  # the Hugging Face module inside the Composer model
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> plan = plan_rotation(model, optimizer, group_size=2, freeze=[0])
    >>> [plan.units[i].name for i in plan.rotating]
    ['model.layers.0', 'model.layers.1', 'model.layers.2', 'model.layers.3', 'model.norm', 'lm_head']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from composer_thaw.core.validation import closest_names
from composer_thaw.utils.optimizer_surgery import group_index_of
from composer_thaw.utils.parameter_selection import ModelUnit, named_parameters, split_into_units

__all__ = ['RotationPlan', 'plan_rotation', 'rotation_units', 'trainable_parameters']


def trainable_parameters(root: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, nn.Parameter]:
    """Parameters of ``root`` that train now: ``requires_grad`` and, if ``optimizer`` is given, in its param groups."""
    in_optimizer = group_index_of(optimizer) if optimizer is not None else None
    return {
        name: param
        for name, param in named_parameters(root).items()
        if param.requires_grad and (in_optimizer is None or id(param) in in_optimizer)
    }


def _units_from_patterns(names: Sequence[str], patterns: Sequence[str]) -> list[ModelUnit]:
    """One unit per regex (``re.search`` on parameter names); each parameter goes to the first regex it matches."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f'groups entry {pattern!r} is not a valid regular expression: {error}.') from None
    members: list[list[str]] = [[] for _ in patterns]
    unmatched = []
    for name in names:
        index = next((i for i, regex in enumerate(compiled) if regex.search(name)), None)
        if index is None:
            unmatched.append(name)
        else:
            members[index].append(name)
    for pattern, names_in in zip(patterns, members):
        if not names_in:
            raise ValueError(
                f'groups entry {pattern!r} matches no trainable parameter (or only ones an earlier entry took). '
                f'Closest parameter names: {closest_names(pattern, names)}.',
            )
    if unmatched:
        raise ValueError(
            f'{len(unmatched)} trainable parameter(s) match no groups entry and would never train, '
            f'e.g. {unmatched[:3]}. '
            "Add a pattern for them (a last entry '.*' collects the rest); to keep a unit out of training, list it and "
            'name its index in `freeze`.',
        )
    return [ModelUnit(pattern, 'other', tuple(names_in)) for pattern, names_in in zip(patterns, members)]


def rotation_units(
    root: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    groups: Optional[Sequence[str]] = None,
) -> list[ModelUnit]:
    """The units in HiFT's order (embeddings, blocks, trailing modules), restricted to parameters that train now.

    Args:
        root: the user's model (:func:`~composer_thaw.utils.parameter_selection.user_module` of a Composer model).
        optimizer: if given, only parameters in its param groups count as trainable.
        groups: regexes, one unit each, replacing the automatic discovery.

    Raises:
        ValueError: no trainable parameters; no repeated blocks and no ``groups``; a ``groups`` entry that matches
            nothing or parameters no entry matches.
    """
    trainable = trainable_parameters(root, optimizer)
    if not trainable:
        raise ValueError(
            f'{type(root).__name__} has no trainable parameters (requiring grad and in the optimizer): HiFT rotation '
            'has nothing to rotate over.',
        )
    if groups:
        return _units_from_patterns(list(trainable), groups)
    try:
        units = split_into_units(root)
    except ValueError:
        names = list(trainable)
        raise ValueError(
            f'No repeated blocks found in {type(root).__name__} (no nn.ModuleList/nn.Sequential of two or more '
            'same-typed children with parameters), so the rotation units cannot be found automatically. Give them '
            "as regexes on parameter names, one unit each, e.g. groups=['^embed', '^layer1\\\\.', '^layer2\\\\.', "
            f"'.*']. Parameter names: {names[:8]}{' ...' if len(names) > 8 else ''}.",
        ) from None
    restricted = [ModelUnit(u.name, u.kind, tuple(n for n in u.parameter_names if n in trainable)) for u in units]
    return [unit for unit in restricted if unit.parameter_names]


@dataclass(frozen=True)
class RotationPlan:
    """The units and their roles: ``rotating`` (in model order), ``frozen`` (never train), ``always`` (every step)."""

    units: tuple[ModelUnit, ...]
    rotating: tuple[int, ...]
    frozen: tuple[int, ...]
    always: tuple[int, ...]
    group_size: int

    @property
    def groups_per_pass(self) -> int:
        return len(self.rotating) // self.group_size

    def names(self, indices: Sequence[int]) -> list[str]:
        return [self.units[i].name for i in indices]


def _unit_list(units: Sequence[ModelUnit]) -> str:
    return ', '.join(f'{i}: {unit.name}' for i, unit in enumerate(units))


def plan_rotation(
    root: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    group_size: int = 1,
    freeze: Optional[Sequence[int]] = None,
    always_trainable: Optional[Sequence[str]] = None,
    groups: Optional[Sequence[str]] = None,
) -> RotationPlan:
    """Find the units and check the options against them; nothing is changed.

    Args:
        root: the user's model.
        optimizer: only parameters in it count as trainable, if given.
        group_size: units per group (HiFT's ``group_element``); at most the number of rotating units.
        freeze: unit indices never trained (HiFT's ``freeze_layers``: embeddings 0, first block 1, ...).
        always_trainable: regexes searched in unit names; the units they match train at every step (LISA keeps the
            embeddings and head on) and leave the rotation.
        groups: regexes replacing the automatic units (see :func:`rotation_units`).

    Raises:
        ValueError: a freeze index out of range, an ``always_trainable`` entry matching no unit, a unit both frozen and
            always trainable, nothing left to rotate, or ``group_size`` larger than the rotating units.
    """
    units = rotation_units(root, optimizer, groups)
    frozen = sorted(set(freeze or ()))
    for index in frozen:
        if not 0 <= index < len(units):
            raise ValueError(
                f'freeze index {index} is out of range: this model has {len(units)} units, indices 0..{len(units) - 1} '
                f'({_unit_list(units)}).',
            )
    always: set[int] = set()
    for pattern in always_trainable or ():
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f'always_trainable entry {pattern!r} is not a valid regular expression: {error}.'
            ) from None
        matched = {i for i, unit in enumerate(units) if regex.search(unit.name)}
        if not matched:
            raise ValueError(
                f'always_trainable entry {pattern!r} matches no unit name. Units: {_unit_list(units)}; closest: '
                f'{closest_names(pattern, [u.name for u in units], n=3)}.',
            )
        always |= matched
    both = sorted(always & set(frozen))
    if both:
        raise ValueError(f'units {[units[i].name for i in both]} are both frozen (freeze) and always_trainable.')
    rotating = tuple(i for i in range(len(units)) if i not in always and i not in frozen)
    if not rotating:
        raise ValueError(
            f'No unit is left to rotate: all {len(units)} units are frozen or always trainable ({_unit_list(units)}).',
        )
    if group_size > len(rotating):
        raise ValueError(
            f'group_size={group_size} is larger than the model: only {len(rotating)} units rotate '
            f'({", ".join(units[i].name for i in rotating)}); use group_size between 1 and {len(rotating)}.',
        )
    return RotationPlan(tuple(units), rotating, tuple(frozen), tuple(sorted(always)), group_size)
