"""Tensors moved off their device and back: HiFT's inactive optimizer state and fp32 masters wait on the host.

On CUDA the copies go to pinned memory without blocking; a sharded (DTensor) tensor moves as its local shard and comes
back laid out as before.

Example:
    >>> master = torch.ones(3)
    >>> offload_tensor(master, 'cpu') is master  # already on the host: nothing moves
    True

    From a GPU it is an :class:`OffloadedTensor` in pinned host memory, and back (these lines need a GPU, so they are
    not run as a test):

    >>> parked = offload_tensor(master.cuda(), 'cpu')  # doctest: +SKIP
    >>> parked.tensor.is_pinned(), parked.restore().device  # doctest: +SKIP
    (True, device(type='cuda', index=0))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from composer_thaw.utils.sharding import ShardLayout, full_tensor, is_sharded, local_tensor

__all__ = ['OffloadedTensor', 'offload_tensor']


@dataclass(frozen=True)
class OffloadedTensor:
    """An optimizer-state tensor moved off its device, and the device it comes back to.

    A sharded (DTensor) state tensor is offloaded as its local shard, with the layout it returns to.
    """

    tensor: torch.Tensor
    device: torch.device
    layout: Optional[ShardLayout] = None

    def restore(self) -> torch.Tensor:
        """The tensor back on its device (as a DTensor again if it was one)."""
        local = self.tensor.to(self.device, non_blocking=True)
        return local if self.layout is None else self.layout.wrap(local)

    def whole(self) -> torch.Tensor:
        """The whole tensor on the host: a sharded one gathered from every rank (a collective: every rank calls it)."""
        return self.tensor if self.layout is None else full_tensor(self.restore()).cpu()


def offload_tensor(
    value: torch.Tensor, device: Union[str, torch.device] = 'cpu'
) -> Union[torch.Tensor, OffloadedTensor]:
    """``value`` moved to ``device`` as an :class:`OffloadedTensor` (its local shard, if sharded), or ``value`` itself
    when it is there already. From a GPU to the host the copy goes to pinned memory without blocking."""
    device = torch.device(device)
    if value.device == device:
        return value
    local = local_tensor(value)
    pin = device.type == 'cpu' and local.is_cuda
    copy = torch.empty(local.shape, dtype=local.dtype, device=device, pin_memory=pin)
    copy.copy_(local, non_blocking=pin)
    return OffloadedTensor(copy, value.device, ShardLayout.of(value) if is_sharded(value) else None)
