"""Bytes of training state counted from shapes: what each algorithm's ``estimate_memory`` builds its plan from.

The memory estimate (:mod:`composer_thaw.recipes.memory_estimate`, ``thaw estimate``) builds a model on the ``meta``
device and hands it to the algorithm's own ``estimate_memory(model, optimizer, algorithm, settings)``, found next
to its class as its ``EXAMPLES`` are. That function applies the algorithm's functional form (which decides what
trains, exactly as in a run) and returns a :class:`MemoryPlan`; the helpers here count its bytes, per process when
FSDP2 shards dim 0 over ``settings.world_size`` processes.

Example:
    >>> from torch import nn
    >>> def estimate_memory(model, optimizer, algorithm, settings):  # in an algorithm's module
    ...     model[0].requires_grad_(False)  # its functional form, which here freezes the first layer
    ...     return resident_plan(optimizer, settings)
    >>> with torch.device('meta'):  # what thaw estimate hands it: shapes, no memory
    ...     model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10))
    >>> plan = estimate_memory(model, torch.optim.AdamW(model.parameters()), None, EstimateSettings())
    >>> plan.optimizer_state_bytes  # AdamW: two fp32 tensors per trained element (10,010), 4 bytes of step each
    80088
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from composer_thaw.utils.master_weights import LOW_PRECISION_DTYPES

__all__ = [
    'OPTIMIZER_STATE',
    'EstimateSettings',
    'MemoryPlan',
    'OptimizerName',
    'master_bytes',
    'resident_plan',
    'shard_numel',
    'state_bytes',
    'tensor_bytes',
    'trainable_params',
    'unique_params',
]

# Optimizer -> (state tensors per parameter, bytes of per-parameter scalars such as Adam's float32 ``step``).
OPTIMIZER_STATE: dict[str, tuple[int, int]] = {
    'adamw': (2, 4),
    'adam': (2, 4),
    'sgd': (1, 0),  # with momentum; plain SGD keeps no state
    'adagrad': (1, 4),
}
OptimizerName = Literal['adamw', 'adam', 'sgd', 'adagrad']


@dataclass(frozen=True)
class EstimateSettings:
    """How the estimated run trains: its optimizer, the processes FSDP2 shards over, fp32 masters and state."""

    optimizer: OptimizerName = 'adamw'
    world_size: int = 1
    fp32_state: bool = False  # master_weights='fp32': fp32 optimizer state and masters for low-precision tensors


@dataclass(frozen=True)
class MemoryPlan:
    """What an algorithm keeps on the training device at its peak, and what it keeps elsewhere.

    Args:
        trainable: the tensors with gradients and optimizer state on the device.
        optimizer_state_bytes: their optimizer state, per process.
        offloaded_state_bytes: state (and masters) kept in host memory (HiFT's inactive groups).
        transfer_bytes_per_step: what moves between host and device per optimizer step.
        mastered: the tensors whose fp32 masters are on the device, when not ``trainable`` (HiFT without offload
            keeps every group's masters there).
        note: a remark for the estimate's table.
    """

    trainable: list[torch.Tensor]
    optimizer_state_bytes: int
    offloaded_state_bytes: int = 0
    transfer_bytes_per_step: int = 0
    mastered: Optional[list[torch.Tensor]] = None
    note: str = ''


def unique_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` without repeats (tied weights count once), in first-seen order."""
    seen: dict[int, torch.Tensor] = {}
    for param in params:
        seen.setdefault(id(param), param)
    return list(seen.values())


def shard_numel(param: torch.Tensor, world_size: int) -> int:
    """Elements of ``param`` on the rank holding the most of it when FSDP2 shards dim 0 over ``world_size`` ranks
    (``torch.chunk``: the first ranks get ``ceil(rows / world_size)`` rows)."""
    if world_size == 1 or param.ndim == 0 or param.shape[0] == 0:
        return param.numel()
    return -(-param.shape[0] // world_size) * (param.numel() // param.shape[0])


def tensor_bytes(params: Iterable[torch.Tensor], world_size: int = 1) -> int:
    """Bytes of ``params`` in their own dtypes, per process."""
    return sum(shard_numel(p, world_size) * p.element_size() for p in params)


def state_bytes(params: Iterable[torch.Tensor], settings: EstimateSettings) -> int:
    """Optimizer state of ``params``: in each parameter's dtype, or fp32 for all (``master_weights='fp32'``)."""
    tensors, scalars = OPTIMIZER_STATE[settings.optimizer]
    return sum(
        tensors * shard_numel(p, settings.world_size) * (4 if settings.fp32_state else p.element_size()) + scalars
        for p in params
    )


def master_bytes(params: Iterable[torch.Tensor], world_size: int = 1) -> int:
    """fp32 bytes for the low-precision tensors among ``params``: their masters (or their fp32 step gradients)."""
    return sum(4 * shard_numel(p, world_size) for p in params if p.dtype in LOW_PRECISION_DTYPES)


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` trains: in its param groups and requiring grad."""
    return unique_params(p for group in optimizer.param_groups for p in group['params'] if p.requires_grad)


def resident_plan(optimizer: torch.optim.Optimizer, settings: EstimateSettings, note: str = '') -> MemoryPlan:
    """The plan of an algorithm that keeps everything it trains on the device (all but HiFT)."""
    trainable = trainable_params(optimizer)
    return MemoryPlan(trainable, state_bytes(trainable, settings), note=note)
