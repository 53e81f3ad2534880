"""Edit optimizers in place: remove and re-add parameters, free, offload and restore their state.

Composer's :func:`composer.utils.module_surgery.update_params_in_optimizer` swaps parameters for model
surgery; freezing needs more: a removed parameter must also lose its ``optimizer.state`` entry (or no
memory is freed and checkpoints disagree with the param groups), and a parameter that comes back must
return to its original param group so weight-decay groups and schedulers keep working.

Param groups are never deleted, only emptied, so scheduler and checkpoint group indices stay valid.

Example:
    >>> model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 2))
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> model(torch.randn(4, 100)).sum().backward(); optimizer.step()
    >>> training_state_bytes(model, optimizer).optimizer_state  # AdamW: 2 fp32 values per element, and a step each
    82432
    >>> removed = remove_params(optimizer, model[0].parameters())  # id(param) -> its group, for add_params
    >>> training_state_bytes(model, optimizer).optimizer_state  # the removed layer holds no state any more
    1624
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from composer_thaw.core.types import Optimizers, single_optimizer
from composer_thaw.utils.master_weights import master_weights_of, release_masters
from composer_thaw.utils.offloading import OffloadedTensor, offload_tensor
from composer_thaw.utils.sharding import local_tensor

__all__ = [
    'TrainingStateBytes',
    'add_params',
    'group_index_of',
    'offload_state',
    'optimizer_state_bytes',
    'remove_params',
    'restore_state',
    'training_state_bytes',
]


def group_index_of(optimizer: Optimizer) -> dict[int, int]:
    """Map ``id(param)`` to the index of the param group that holds it."""
    return {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group['params']}


def remove_params(optimizer: Optimizer, params: Iterable[torch.Tensor]) -> dict[int, int]:
    """Remove ``params`` from ``optimizer``: from their param groups and from ``optimizer.state``.

    Parameters not in the optimizer are ignored. Each removed parameter's ``.grad`` is dropped too, and so is its fp32
    master copy (:mod:`composer_thaw.utils.master_weights`).

    Returns:
        ``id(param) -> group index`` for each removed parameter, to put it back with :func:`add_params`.
    """
    groups = group_index_of(optimizer)
    removed: dict[int, int] = {}
    to_remove = {id(p): p for p in params if id(p) in groups}
    for group in optimizer.param_groups:
        group['params'] = [p for p in group['params'] if id(p) not in to_remove]
    for key, param in to_remove.items():
        removed[key] = groups[key]
        optimizer.state.pop(param, None)
        param.grad = None
    release_masters(optimizer, to_remove.values())  # fp32 master copies (master_weights='fp32') go with the state
    return removed


def add_params(
    optimizer: Optimizer,
    params_by_group: Mapping[int, Sequence[torch.Tensor]],
    order: Optional[dict[int, int]] = None,
) -> None:
    """Add parameters to the param groups given by index; keep each group sorted by ``order`` if given.

    Args:
        optimizer: the optimizer to edit.
        params_by_group: group index -> parameters to add to that group. Parameters already present are skipped.
        order: ``id(param) -> position`` (e.g. the model's registration order), so a group's parameter order is
            the same whatever order parameters were removed and added in; this keeps foreach kernels and
            checkpoints deterministic.
    """
    present = group_index_of(optimizer)
    for index, params in params_by_group.items():
        if not 0 <= index < len(optimizer.param_groups):
            raise IndexError(f'param group {index} does not exist; the optimizer has {len(optimizer.param_groups)}.')
        group = optimizer.param_groups[index]
        group['params'].extend(p for p in params if id(p) not in present)
        if order is not None:
            group['params'].sort(key=lambda p: order.get(id(p), len(order)))


def _state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return [value for value in state.values() if isinstance(value, torch.Tensor)]


def optimizer_state_bytes(optimizer: Optimizer, device: Optional[torch.device] = None) -> int:
    """Bytes held by ``optimizer.state`` tensors (this rank's shards of sharded ones), only those on ``device`` if
    given."""
    total = 0
    for state in optimizer.state.values():
        for tensor in _state_tensors(state):
            if device is None or tensor.device.type == torch.device(device).type:
                total += local_tensor(tensor).numel() * tensor.element_size()
    return total


def offload_state(
    optimizer: Optimizer,
    params: Iterable[torch.Tensor],
    device: Union[str, torch.device] = 'cpu',
) -> dict[int, dict[str, Any]]:
    """Take the optimizer state of ``params`` out of ``optimizer.state``, moved to ``device``.

    On CUDA the copies go to pinned memory without blocking. The returned mapping
    (``id(param) -> state``) is what :func:`restore_state` puts back.
    """
    offloaded: dict[int, dict[str, Any]] = {}
    for param in params:
        state = optimizer.state.pop(param, None)
        if state is not None:
            offloaded[id(param)] = {
                key: offload_tensor(value, device) if isinstance(value, torch.Tensor) else value
                for key, value in state.items()
            }
    return offloaded


def restore_state(optimizer: Optimizer, params: Iterable[torch.Tensor], offloaded: dict[int, dict[str, Any]]) -> None:
    """Put state taken by :func:`offload_state` back into ``optimizer.state``, each tensor on its original device."""
    for param in params:
        state = offloaded.pop(id(param), None)
        if state is None:
            continue
        optimizer.state[param] = {
            key: value.restore() if isinstance(value, OffloadedTensor) else value for key, value in state.items()
        }


@dataclass(frozen=True)
class TrainingStateBytes:
    """Bytes of training state: parameters, gradients, optimizer state, and fp32 master copies
    (``master_weights='fp32'``, :mod:`composer_thaw.utils.master_weights`)."""

    params: int
    grads: int
    optimizer_state: int
    masters: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state + self.masters


def training_state_bytes(model: nn.Module, optimizers: Optional[Optimizers] = None) -> TrainingStateBytes:
    """Count the bytes of ``model``'s parameters and gradients and of the optimizer's state held by this process.

    Tied parameters count once; of a sharded (FSDP2) tensor only this rank's shard counts. Optimizer state counts
    every tensor in ``optimizer.state``, wherever it lives; state moved out of the optimizer (offloaded) is not
    counted. The optimizer's fp32 master copies count apart (``masters``).
    """
    params = [local_tensor(p) for p in model.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(
        local_tensor(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    optimizer = single_optimizer(optimizers)
    state_bytes = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    masters = master_weights_of(optimizer)
    return TrainingStateBytes(param_bytes, grad_bytes, state_bytes, masters.master_bytes() if masters else 0)
