"""Resume from FSDP2's sharded checkpoints when which parameters hold optimizer state changes during training.

Composer reads a sharded checkpoint (``state_dict_type='sharded'``) with ``torch.distributed.checkpoint`` in one
pass, into the state dict the fresh Trainer has: its optimizer template holds state for every parameter that
requires grad *before* the algorithms' own state is loaded. LayerFreezing (frozen parameters leave the optimizer)
and HiFTRotation (only the active group holds state) save less than that, so the read fails with ``Missing key``.

Such an algorithm calls :func:`defer_optimizer_load` at :attr:`~composer.core.Event.BEFORE_LOAD` and
:func:`load_deferred_optimizer` at :attr:`~composer.core.Event.AFTER_LOAD`. In between, Composer's pass reads
everything but the optimizer (its template is empty, and no optimizer state is allocated for it); the algorithms'
``load_state_dict`` re-freezes the model as the checkpoint had it; then the optimizer is read, with the template
of the optimizer as it is now, from the same checkpoint. Several algorithms may call both: the first one acts.
Full checkpoints, weights-only loads and runs without a checkpoint are left to Composer unchanged.

Example:
    >>> from composer.core import Algorithm, Event
    >>> class FreezeSome(Algorithm):  # its optimizer ends up holding state for fewer parameters than at the start
    ...     def match(self, event, state):
    ...         return event in (Event.BEFORE_LOAD, Event.AFTER_LOAD)
    ...     def apply(self, event, state, logger):
    ...         if event == Event.BEFORE_LOAD:
    ...             defer_optimizer_load(state)
    ...         else:  # its load_state_dict has frozen the model as the checkpoint had it
    ...             load_deferred_optimizer(state)
    >>> FreezeSome().match(Event.AFTER_LOAD, None)
    True
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed.checkpoint as dist_cp
from composer.core import State
from composer.utils import dist, ensure_tuple
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

__all__ = ['defer_optimizer_load', 'load_deferred_optimizer']


@dataclass
class _Deferral:
    """One optimizer's deferred load: ``'template'`` until Composer builds its load template, then ``'loading'``."""

    phase: str = 'template'
    placeholder: Any = None  # the parameter whose empty state entry stops torch from initialising all state
    handle: Optional[RemovableHandle] = None


_DEFERRALS: weakref.WeakKeyDictionary[Optimizer, _Deferral] = weakref.WeakKeyDictionary()


def _loads_sharded_checkpoints(state: State) -> bool:
    return bool(state.fsdp_enabled and state.fsdp_sharded_state_dict_enabled)


def defer_optimizer_load(state: State) -> None:
    """Call at ``Event.BEFORE_LOAD``: a sharded checkpoint's optimizer state will be read at ``Event.AFTER_LOAD``."""
    if not _loads_sharded_checkpoints(state):
        return
    for optimizer in ensure_tuple(state.optimizers):
        if optimizer in _DEFERRALS:
            continue
        deferral = _Deferral()
        if not optimizer.state:  # torch initialises every trainable parameter's state for a template of an empty one
            deferral.placeholder = next(p for group in optimizer.param_groups for p in group['params'])
            optimizer.state[deferral.placeholder] = {}
        deferral.handle = optimizer.register_state_dict_post_hook(lambda opt, sd, d=deferral: _template(opt, sd, d))
        _DEFERRALS[optimizer] = deferral


def _drop_placeholder(optimizer: Optimizer, deferral: _Deferral) -> None:
    if deferral.placeholder is not None and optimizer.state.get(deferral.placeholder) == {}:
        del optimizer.state[deferral.placeholder]
    deferral.placeholder = None


def _template(optimizer: Optimizer, state_dict: dict[str, Any], deferral: _Deferral) -> Optional[dict[str, Any]]:
    """The first state dict asked for after ``BEFORE_LOAD`` is Composer's load template: its param groups (their
    keys are the same whatever trains) and no per-parameter state."""
    if deferral.phase != 'template':
        return None
    deferral.phase = 'loading'
    _drop_placeholder(optimizer, deferral)
    return {'state': {}, 'param_groups': state_dict['param_groups']}


def load_deferred_optimizer(state: State) -> None:
    """Call at ``Event.AFTER_LOAD``, after the algorithms re-froze the model: read the optimizer state deferred by
    :func:`defer_optimizer_load` from ``state.load_path``, for the parameters that are in the optimizer now."""
    deferrals = {
        optimizer: _DEFERRALS.pop(optimizer) for optimizer in ensure_tuple(state.optimizers) if optimizer in _DEFERRALS
    }
    for optimizer, deferral in deferrals.items():
        if deferral.handle is not None:
            deferral.handle.remove()
        _drop_placeholder(optimizer, deferral)
    if not any(deferral.phase == 'loading' for deferral in deferrals.values()) or state.load_path is None:
        return  # no checkpoint, or a weights-only one: Composer never asked for the optimizer
    optimizers = state.get_optim_state_dict()  # Composer's template for the optimizer as it is now
    with _checkpoint_reader(state.load_path, state) as reader:
        dist_cp.load({'state': {'optimizers': optimizers}}, storage_reader=reader)
    state.load_optim_state({'optimizers': optimizers})


@contextmanager
def _checkpoint_reader(load_path: str, state: State) -> Iterator[dist_cp.StorageReader]:
    """The sharded checkpoint at ``load_path`` (a folder, a link to one, or an object-store URI), as Composer reads
    it; an object store's files are downloaded to a temporary folder for the duration."""
    from composer.utils.checkpoint import DistCPObjectStoreReader, FileSystemReaderWithValidation
    from composer.utils.file_helpers import maybe_create_object_store_from_uri, parse_uri

    object_store = maybe_create_object_store_from_uri(load_path)
    _, _, path = parse_uri(load_path)
    if object_store is None:
        yield FileSystemReaderWithValidation(os.path.realpath(path))
        return
    with tempfile.TemporaryDirectory() as download:
        local_rank_zero = dist.get_global_rank() - dist.get_local_rank()
        folder = str(dist.all_gather_object(download)[local_rank_zero])
        try:
            yield DistCPObjectStoreReader(
                source_path=path,
                destination_path=str(Path(folder) / 'checkpoints'),
                object_store=object_store,
                device_mesh=state.device_mesh,
            )
        finally:
            dist.barrier()  # every rank has read before local rank 0's download is removed
