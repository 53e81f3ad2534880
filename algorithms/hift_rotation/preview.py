"""A dry-run table of HiFT's units and groups for a model, without changing it.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> print(rotation_preview(tiny_decoder('llama', num_layers=2), group_size=2))
    index  unit                      params   share   Adam state  role
        0  model.embed_tokens     1,953,408   49.0%     14.90 MiB  rotates
        1  model.layers.0            41,088    1.0%      0.31 MiB  rotates
    ...
    pass 1:
      group 1: model.embed_tokens, model.layers.0  (50.0% of the parameters train)
      group 2: model.layers.1, model.norm  (1.0% of the parameters train)
    pass 2:
      group 1: lm_head, model.embed_tokens  (97.9% of the parameters train)
      group 2: model.layers.0, model.layers.1  (2.1% of the parameters train)
    largest trainable share: 97.9% (optimizer state resident at most this share)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from composer_thaw.hift_rotation.queue import GroupQueue, Strategy
from composer_thaw.hift_rotation.units import plan_rotation
from composer_thaw.utils.parameter_selection import user_module

__all__ = ['rotation_preview']


def rotation_preview(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    group_size: int = 1,
    strategy: Strategy = 'down2up',
    freeze: Optional[Sequence[int]] = None,
    always_trainable: Optional[Sequence[str]] = None,
    groups: Optional[Sequence[str]] = None,
    passes: int = 2,
) -> str:
    """A table of the units (index, name, parameters, share of the trainable parameters, Adam-state bytes, role) and
    the groups each of the first ``passes`` passes visits, in order. The model is not changed.

    ``random`` draws a new order every pass at run time; the table then shows the units, not the order.

    Raises:
        ValueError: the errors :class:`HiFTRotation` raises for these options on this model.
    """
    plan = plan_rotation(user_module(model), optimizer, group_size, freeze, always_trainable, groups)
    named = dict(user_module(model).named_parameters())
    sizes = [sum(named[n].numel() for n in unit.parameter_names) for unit in plan.units]
    total = sum(sizes)
    bytes_per = [
        sum(2 * named[n].numel() * named[n].element_size() for n in unit.parameter_names) for unit in plan.units
    ]
    role = dict.fromkeys(plan.rotating, 'rotates')
    role.update(dict.fromkeys(plan.frozen, 'frozen'))
    role.update(dict.fromkeys(plan.always, 'always trainable'))
    width = max(len(unit.name) for unit in plan.units)
    lines = [f'{"index":>5}  {"unit":<{width}}  {"params":>12}  {"share":>6}  {"Adam state":>11}  role']
    for i, unit in enumerate(plan.units):
        lines.append(
            f'{i:>5}  {unit.name:<{width}}  {sizes[i]:>12,}  {sizes[i] / total:>6.1%}  '
            f'{bytes_per[i] / 2**20:>8.2f} MiB  {role[i]}'
        )
    lines.append(f'{"":>5}  {"total":<{width}}  {total:>12,}')
    queue = GroupQueue(plan.rotating, group_size, strategy)
    always = sum(sizes[i] for i in plan.always)
    lines.append('')
    if strategy == 'random':
        lines.append(
            f'strategy random: {plan.groups_per_pass} groups of {group_size} units per pass, a new order '
            'every pass (seeded by the run).'
        )
        return '\n'.join(lines)
    largest = 0
    for pass_index in range(passes):
        lines.append(f'pass {pass_index + 1}:')
        for step in range(plan.groups_per_pass):
            group, _ = queue.next_group()
            share = sum(sizes[i] for i in group) + always
            largest = max(largest, share)
            lines.append(
                f'  group {step + 1}: {", ".join(plan.units[i].name for i in group)}'
                f'  ({share / total:.1%} of the parameters train)'
            )
    lines.append(f'largest trainable share: {largest / total:.1%} (optimizer state resident at most this share)')
    return '\n'.join(lines)
