"""HiFT's memory plan for ``thaw estimate``: what the rotation keeps on the device at its peak, on the host, and
moves per step (found next to :class:`~composer_thaw.hift_rotation.HiFTRotation` as its ``EXAMPLES`` are).

Example:
    >>> from composer_thaw.hift_rotation import HiFTRotation
    >>> from composer_thaw.models.specs import load_model_config, meta_model
    >>> from composer_thaw.utils.memory import EstimateSettings
    >>> model = meta_model(load_model_config('llama-7b', {'num_hidden_layers': 4}), torch.bfloat16)  # no memory
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> plan = estimate_memory(model, optimizer, HiFTRotation(group_size=1), EstimateSettings(fp32_state=True))
    >>> round(plan.optimizer_state_bytes / 2**30, 2)  # GiB: the largest unit's fp32 optimizer state, on the device
    1.51
    >>> round(plan.offloaded_state_bytes / 2**30, 2)  # the other units' fp32 optimizer state and masters, on the host
    9.72
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import torch
from torch import nn

from composer_thaw.hift_rotation.queue import GroupQueue
from composer_thaw.hift_rotation.units import plan_rotation
from composer_thaw.utils.memory import (
    EstimateSettings,
    MemoryPlan,
    master_bytes,
    state_bytes,
    tensor_bytes,
    unique_params,
)

__all__ = ['estimate_memory']

# With more rotating units than this, the random strategy's largest possible group is bounded by the largest units
# instead of trying every combination.
_COMBINATIONS_UP_TO = 12


def estimate_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: Any, settings: EstimateSettings
) -> MemoryPlan:
    """Resident (the largest group and the always-trainable units) and offloaded state under ``algorithm``'s
    rotation (a :class:`~composer_thaw.hift_rotation.HiFTRotation`), and the bytes moved between host and device per
    step (a group's state out and the next one's in at each switch). With fp32 masters a group's masters live and
    move with its optimizer state; without offload every group's stay on the device.

    Raises:
        ValueError: for ``lora=True`` (estimate ``lora_inject``: the rotation only lowers its small adapter state).
    """
    if algorithm.lora:
        raise ValueError(
            'lora=true is not estimated; estimate lora_inject instead (the rotation only lowers its small adapter '
            'state further).'
        )
    group_size = algorithm.group_size
    plan = plan_rotation(model, optimizer, group_size, algorithm.freeze, algorithm.always_trainable, algorithm.groups)
    named = dict(model.named_parameters())
    unit_params = [unique_params(named[n] for n in unit.parameter_names) for unit in plan.units]
    always = [p for i in plan.always for p in unit_params[i]]
    if algorithm.strategy == 'random':  # any group can come up: the largest possible one bounds the resident share
        if len(plan.rotating) <= _COMBINATIONS_UP_TO:
            groups = list(combinations(plan.rotating, group_size))
        else:
            groups = [tuple(sorted(plan.rotating, key=lambda i: -tensor_bytes(unit_params[i]))[:group_size])]
    else:  # every group the queue visits, until it comes back to its start
        queue = GroupQueue(plan.rotating, group_size, algorithm.strategy)
        groups = [queue.next_group()[0] for _ in range(max(1, len(plan.rotating)) * max(1, plan.groups_per_pass))]
    largest = max(groups, key=lambda g: tensor_bytes(p for i in g for p in unit_params[i]))
    resident = unique_params([*always, *(p for i in largest for p in unit_params[i])])
    rotating = unique_params(p for i in plan.rotating for p in unit_params[i])
    on_device = resident if algorithm.offload else unique_params([*always, *rotating])

    def moving_bytes(params: list[torch.Tensor]) -> int:  # what leaves the device with a group: state and masters
        masters = master_bytes(params, settings.world_size) if settings.fp32_state else 0
        return state_bytes(params, settings) + masters

    transfer = 0
    if algorithm.offload and len(groups) > 1:  # each switch: the leaving group's state out, the entering group's in
        group_state = [moving_bytes([p for i in g for p in unit_params[i]]) for g in groups]
        switches = sum(group_state[k] + group_state[(k + 1) % len(groups)] for k in range(len(groups)))
        transfer = switches // (len(groups) * algorithm.steps_per_group)
    where = 'offloaded to the host' if algorithm.offload else 'kept on the device'
    note = (
        f"largest group: {', '.join(plan.names(largest))}; other groups' optimizer state {where} once visited"
        f'{", with their fp32 masters" if settings.fp32_state else ""}'
    )
    return MemoryPlan(
        trainable=resident,
        optimizer_state_bytes=state_bytes(on_device, settings),
        offloaded_state_bytes=moving_bytes(unique_params([*always, *rotating])) - moving_bytes(on_device),
        transfer_bytes_per_step=transfer,
        mastered=on_device,
        note=note,
    )
