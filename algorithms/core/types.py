"""The optimizers Composer hands an algorithm (``state.optimizers``: one, or a sequence), and the one the package's
algorithms work with.

Example:
    >>> import torch
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    >>> single_optimizer([optimizer]) is single_optimizer(optimizer) is optimizer  # state.optimizers: either form
    True
    >>> single_optimizer(None) is None
    True
    >>> single_optimizer([optimizer, optimizer])
    Traceback (most recent call last):
    NotImplementedError: Only one optimizer is supported, got 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

from torch.optim import Optimizer

__all__ = ['Optimizers', 'single_optimizer']

Optimizers = Union[Optimizer, Sequence[Optimizer]]


def single_optimizer(optimizers: Optional[Optimizers]) -> Optional[Optimizer]:
    """The one optimizer in ``optimizers`` (``None`` if there is none).

    Raises:
        NotImplementedError: for more than one optimizer, as Composer's own surgery does.
    """
    if optimizers is None:
        return None
    if isinstance(optimizers, Optimizer):
        return optimizers
    optimizers = list(optimizers)
    if len(optimizers) > 1:
        raise NotImplementedError(f'Only one optimizer is supported, got {len(optimizers)}.')
    return optimizers[0] if optimizers else None
