"""Keep the frozen rows of partially trainable tensors bit-identical while the rest of the tensor trains.

Zeroing the gradient of frozen rows (what axolotl does) is not enough: AdamW's decoupled weight decay and any
momentum still move them. So a :class:`RowFreezer` does two things:

* a gradient hook replaces the incoming gradient by a copy whose frozen rows are zero, before it is accumulated
  (so gradient accumulation, DDP's all-reduce and gradient clipping all see zeros there), and
* optimizer step hooks copy the frozen rows before each ``optimizer.step()`` and write them back afterwards,
  which undoes weight decay and any other update exactly.

Under FSDP2 each rank does both on the rows of its own shard (global row ranges are mapped onto it), and the
gradient is masked after FSDP2's reduce-scatter, in a post-accumulate-grad hook.

The optimizer keeps full-size state for these tensors (the state of the frozen rows stays zero with Adam-style
optimizers). The copy taken before each step lives only during the step.

Composer's EMA averages ``ema * s + p * (1 - s)``, which can move a constant value by one ulp, and swaps its
averaged weights into the model for evaluation and checkpoints; :func:`sync_ema_frozen_rows` puts the exact frozen
values back into both copies.

Example:
    >>> embedding = nn.Embedding(8, 2)
    >>> optimizer = torch.optim.AdamW(embedding.parameters(), lr=0.1, weight_decay=0.1)
    >>> before = embedding.weight.detach().clone()
    >>> RowFreezer(optimizer, {embedding.weight: ((4, 8),)}).install()  # rows 4..7 stay as they are
    >>> embedding(torch.arange(8)).sum().backward(); optimizer.step()
    >>> embedding.weight[4:].equal(before[4:]), embedding.weight[:4].equal(before[:4])
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from composer_thaw.utils.sharding import is_sharded, local_rows, local_tensor

__all__ = ['RowFreezer', 'sync_ema_frozen_rows']

Ranges = tuple[tuple[int, int], ...]


def _zero_rows_hook(frozen_rows: Ranges):
    def zero_frozen_rows(grad: torch.Tensor) -> torch.Tensor:
        if grad.is_sparse:
            raise NotImplementedError(
                'RegexFreeze row ranges do not support sparse gradients (nn.Embedding(sparse=True)).'
            )
        grad = grad.clone()
        for start, end in frozen_rows:
            grad[start:end] = 0
        return grad

    return zero_frozen_rows


def _zero_local_rows_hook(local_frozen_rows: Ranges):
    """For a sharded parameter: FSDP2 writes the reduced gradient shard into ``param.grad`` and then runs the
    parameter's post-accumulate-grad hooks (before any clipping or optimizer step); zero the frozen rows there."""

    @torch.no_grad()
    def zero_frozen_rows(param: torch.Tensor) -> None:
        if param.grad is not None:
            grad = local_tensor(param.grad)
            for start, end in local_frozen_rows:
                grad[start:end] = 0

    return zero_frozen_rows


class RowFreezer:
    """Masks gradients of and restores frozen rows of ``frozen_rows``' parameters around ``optimizer``'s steps.

    Args:
        optimizer: the optimizer that updates the parameters (its step hooks do the restoring).
        frozen_rows: parameter -> merged half-open global row ranges (dim 0) that must not change.
    """

    def __init__(self, optimizer: Optimizer, frozen_rows: dict[nn.Parameter, Ranges]):
        self.optimizer = optimizer
        self.frozen_rows = {param: ranges for param, ranges in frozen_rows.items() if ranges}
        # The rows of each rank's own part of the parameter (all of them unless it is a sharded DTensor).
        self.local_frozen_rows = {param: local_rows(param, ranges) for param, ranges in self.frozen_rows.items()}
        self._handles: list[Any] = []
        self._saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if self.installed or not self.frozen_rows:
            return
        for param, ranges in self.local_frozen_rows.items():
            if is_sharded(param):
                self._handles.append(param.register_post_accumulate_grad_hook(_zero_local_rows_hook(ranges)))
            else:
                self._handles.append(param.register_hook(_zero_rows_hook(ranges)))
        self._handles.append(self.optimizer.register_step_pre_hook(self._save_frozen_rows))
        self._handles.append(self.optimizer.register_step_post_hook(self._restore_frozen_rows))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._saved = []

    @torch.no_grad()
    def _save_frozen_rows(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._saved = [
            (local, start, end, local[start:end].clone())
            for param, ranges in self.local_frozen_rows.items()
            for local in (local_tensor(param),)
            for start, end in ranges
        ]

    @torch.no_grad()
    def _restore_frozen_rows(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for local, start, end, rows in self._saved:
            local[start:end].copy_(rows)
        self._saved = []


@torch.no_grad()
def sync_ema_frozen_rows(
    model: nn.Module,
    algorithms: Iterable[Any],
    frozen_rows: dict[nn.Parameter, Ranges],
) -> int:
    """Make the frozen rows of every Composer EMA copy equal to the model's exact frozen values.

    Whichever copy holds the training weights (the model, or EMA's store while EMA weights are swapped in) is the
    source; the other copy's frozen rows are overwritten. Returns the number of tensors corrected.
    """
    from composer.algorithms import EMA

    by_id = {id(param): ranges for param, ranges in frozen_rows.items() if ranges}
    if not by_id:
        return 0
    corrected = 0
    for algorithm in algorithms:
        if not isinstance(algorithm, EMA) or algorithm.ema_model is None:
            continue
        store = algorithm.ema_model.named_parameters_dict
        training_weights_in_model = not algorithm.ema_weights_active
        for name, param in model.named_parameters():
            ranges = by_id.get(id(param))
            copy: Optional[torch.Tensor] = store.get(name)
            if ranges is None or copy is None:
                continue
            for start, end in ranges:
                if training_weights_in_model:
                    copy[start:end].copy_(param[start:end])
                else:
                    param[start:end].copy_(copy[start:end])
            corrected += 1
    return corrected
