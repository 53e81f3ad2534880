"""What the algorithms need to know about sharded parameters (Composer's FSDP2: DTensors sharded on dim 0).

Under FSDP2 every parameter is a :class:`~torch.distributed.tensor.DTensor`; a rank holds a contiguous block of
rows (``torch.chunk`` of dim 0). Names, ``requires_grad`` and param-group membership work as for plain tensors, so
freezing and optimizer surgery need nothing special. What does: writing into given rows (a global row range must
be mapped onto the rank's block), reading a whole tensor (gathered from every rank), and gradients, which FSDP2
writes into ``param.grad`` after its reduce-scatter instead of accumulating them through autograd (so a
``register_hook`` on the sharded parameter never runs; a post-accumulate-grad hook does).

FSDP1 (Composer's ``FSDPConfig``) flattens parameters into ``FlatParameter``\\ s that optimizers and names cannot see
through; :func:`refuse_fsdp1` stops an algorithm there, before it changes anything, and names FSDP2 as the way.

Example:
    >>> param = torch.zeros(128, 4)
    >>> local_rows(param, ((0, 100),))  # rows 0..99 of the whole tensor, as rows of what this process holds: all
    ((0, 100),)

    The same parameter sharded by FSDP2 over 2 processes (which a unit test does not start, so this line is not run
    as one): rank 0 holds rows 0..63, rank 1 rows 64..127.

    >>> local_rows(sharded_param, ((0, 100),))  # doctest: +SKIP
    ((0, 64),)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    'FSDP2_HINT',
    'ShardLayout',
    'average_gradients_on_gloo',
    'full_tensor',
    'is_sharded',
    'local_part',
    'local_rows',
    'local_tensor',
    'refuse_fsdp1',
    'row_offset',
    'shard_like',
]

RowRanges = tuple[tuple[int, int], ...]

FSDP2_HINT = (
    "use FSDP2 instead: Trainer(parallelism_config={'fsdp': FSDP2Config()}) with FSDP2Config from "
    "composer.utils.parallelism, a recipe's `parallelism: {fsdp: {...}}`, or llm-foundry's fsdp_config with the "
    'environment variable FSDP_VERSION=2'
)


@dataclass(frozen=True)
class ShardLayout:
    """How a DTensor is laid out (mesh, placements, global shape and stride), without its data."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> ShardLayout:
        return cls(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tensor.stride())  # type: ignore[attr-defined]

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """A DTensor of this layout whose local part is ``local`` (no communication)."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, self.mesh, self.placements, shape=self.shape, stride=self.stride)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded or replicated parameter, or its gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (the tensor itself when it is not a DTensor); writes to it change ``tensor``."""
    return tensor._local_tensor if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def row_offset(tensor: torch.Tensor) -> int:
    """The global index of this rank's first row of ``tensor`` (0 when it is not sharded)."""
    if not is_sharded(tensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tensor.placements  # type: ignore[attr-defined]
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, placements)  # type: ignore[attr-defined]
    return int(offset[0]) if offset else 0


def local_rows(tensor: torch.Tensor, ranges: RowRanges) -> RowRanges:
    """Map half-open global row ranges of ``tensor`` onto the rows of this rank's shard (dropping empty ones)."""
    offset = row_offset(tensor)
    rows = local_tensor(tensor).shape[0] if tensor.ndim else 0
    mapped = []
    for start, end in ranges:
        local_start, local_end = max(start - offset, 0), min(end - offset, rows)
        if local_start < local_end:
            mapped.append((local_start, local_end))
    return tuple(mapped)


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``full`` (a whole tensor shaped like ``like``) that this rank holds of ``like``; all of ``full``
    when ``like`` is not sharded. Stays on ``full``'s device."""
    if not is_sharded(like):
        return full
    offset, rows = row_offset(like), local_tensor(like).shape[0]
    return full[offset : offset + rows]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``, gathered from every rank when it is sharded (a collective: call it on every rank)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, the same on every rank) laid out as ``like`` is: a DTensor with ``like``'s mesh and
    placements, each rank keeping its own part without communication; ``full`` itself when ``like`` is not sharded."""
    if not is_sharded(like) or is_sharded(full) or full.shape != like.shape:
        return full
    return ShardLayout.of(like).wrap(local_part(full, like).to(like.device))


def refuse_fsdp1(state: Any, algorithm: str) -> None:
    """Raise ``NotImplementedError`` when the Trainer uses FSDP1, naming FSDP2 as the supported way."""
    from composer.utils.parallelism import FSDPConfig

    if isinstance(getattr(state, 'fsdp_config', None), FSDPConfig):
        raise NotImplementedError(
            f'{algorithm} does not support FSDP1 (FSDPConfig): it flattens parameters into FlatParameters, which '
            f'{algorithm} cannot freeze or select one by one; {FSDP2_HINT}.',
        )


def average_gradients_on_gloo() -> None:
    """Make FSDP2 average gradients across processes on the gloo backend (CPU), as it does on NCCL. Idempotent.

    For fp32 and bf16 gradients FSDP2 reduce-scatters with ``ReduceOp.AVG``, which gloo silently treats as a sum: on
    CPU every gradient came out ``world_size`` times a single process's (SGD at 2 processes took twice the step, and
    AdamW's moments carried the scale, so a checkpoint resumed at another world size drifted). This patches FSDP2's
    choice of divide factors (``torch.distributed.fsdp._fully_shard._fsdp_collectives``) so that a gloo group sums and
    then divides once by the data-parallel size; other backends keep FSDP2's own choice. Our algorithms call it at
    ``Event.INIT`` under FSDP2, and ``thaw run`` when its recipe shards.
    """
    import torch.distributed as torch_dist
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    original = collectives._get_gradient_divide_factors
    if getattr(original, 'averages_on_gloo', False):
        return
    # torch 2.7 returns (predivide, postdivide), (None, None) meaning ReduceOp.AVG; newer torch returns
    # (predivide, postdivide, reduce_scatter_op, all_reduce_op) and can be asked for sums and one division.
    asks_for_sums = 'force_sum_reduction_for_comms' in inspect.signature(original).parameters

    def divide_factors(reduce_scatter_group: Any, all_reduce_group: Any, *args: Any, **kwargs: Any) -> Any:
        group = reduce_scatter_group if reduce_scatter_group is not None else all_reduce_group
        if group is None or torch_dist.get_backend(group) != 'gloo':
            return original(reduce_scatter_group, all_reduce_group, *args, **kwargs)
        if asks_for_sums:
            call = inspect.signature(original).bind(reduce_scatter_group, all_reduce_group, *args, **kwargs)
            call.arguments['force_sum_reduction_for_comms'] = True
            return original(*call.args, **call.kwargs)
        factors = original(reduce_scatter_group, all_reduce_group, *args, **kwargs)
        if factors[0] is not None:
            return factors
        size = reduce_scatter_group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1)
        return 1.0, float(size)  # a predivide factor makes FSDP2 sum; the postdivide factor averages once

    divide_factors.averages_on_gloo = True  # type: ignore[attr-defined]
    collectives._get_gradient_divide_factors = divide_factors
