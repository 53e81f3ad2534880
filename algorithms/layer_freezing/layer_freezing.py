"""Progressive layer freezing (FreezeOut-style) that frees optimizer memory, skips frozen backward and resumes.

Same arguments, defaults and schedule as :class:`composer.algorithms.LayerFreezing`. Unlike Composer's, a
frozen parameter also loses its ``optimizer.state`` entry and its gradient; tied weights are frozen only when
every module using them is frozen; freezing can be re-evaluated every N batches; and the frozen units are
checkpointed, so a resumed run is bit-identical to an uninterrupted one.

Example:
    >>> from composer import Trainer
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.layer_freezing import LayerFreezing
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=4)
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='4ba',
    ...                   algorithms=[LayerFreezing(freeze_start=0.0, freeze_level=0.5,
    ...                                             granularity='block', interval=1)], progress_bar=False)
    >>> trainer.fit()
    >>> decoder = model.model.model  # the embeddings froze first; the head never freezes
    >>> [p.requires_grad for p in (decoder.embed_tokens.weight, decoder.layers[3].mlp.up_proj.weight)]
    [False, True]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, Union

import torch
from composer.core import Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import ensure_tuple
from torch.optim import Optimizer

from composer_thaw.core.compatibility import ADAPTERS, BASE_PARAMETERS, Claim
from composer_thaw.layer_freezing.units import (
    GRANULARITIES,
    FreezeUnit,
    Granularity,
    freezable_units,
    parameters_to_freeze,
)
from composer_thaw.utils.deferred_optimizer_load import defer_optimizer_load, load_deferred_optimizer
from composer_thaw.utils.master_weights import MasterWeightsOption
from composer_thaw.utils.memory import EstimateSettings, MemoryPlan, resident_plan
from composer_thaw.utils.optimizer_surgery import optimizer_state_bytes, remove_params
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.thaw_algorithm import ThawAlgorithm

log = logging.getLogger(__name__)

__all__ = ['FreezeSchedule', 'LayerFreezing', 'estimate_memory', 'freeze_layers', 'freeze_units', 'linear_schedule']

FreezeSchedule = Callable[[float, float, float], float]
"""``schedule(elapsed, freeze_start, freeze_level) -> fraction of freezable units to freeze``."""

EXAMPLES: tuple[dict[str, Any], ...] = (
    {},
    {'freeze_start': 0.0, 'freeze_level': 0.5, 'granularity': 'block', 'interval': 2},
    {'freeze_start': 0.25, 'freeze_level': 0.75, 'granularity': 'leaf', 'interval': 'epoch'},
)


def linear_schedule(elapsed: float, freeze_start: float, freeze_level: float) -> float:
    """Composer's schedule: nothing until ``freeze_start``, then linear up to ``freeze_level`` at the end."""
    if elapsed <= freeze_start:
        return 0.0
    return freeze_level * ((elapsed - freeze_start) / (1.0 - freeze_start))


def _check_fraction(name: str, value: Any, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name}={value!r} must be a number in [0, 1] ({meaning}).')
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name}={value!r} is outside [0, 1]; it is {meaning}.')


def _check_arguments(freeze_start: Any, freeze_level: Any, granularity: Any, schedule: Any) -> None:
    _check_fraction('freeze_start', freeze_start, 'the fraction of training to run before freezing begins')
    _check_fraction('freeze_level', freeze_level, 'the fraction of freezable layers frozen at the end of training')
    if granularity not in GRANULARITIES:
        raise ValueError(
            f'granularity={granularity!r} is not supported; choose one of {list(GRANULARITIES)} '
            "('leaf': every module with parameters, as Composer; 'block': embeddings, then each repeated block).",
        )
    if schedule is not None and not callable(schedule):
        raise TypeError(
            f'schedule={schedule!r} must be None (linear) or a callable '
            '(elapsed, freeze_start, freeze_level) -> fraction.',
        )


def freeze_units(
    model: torch.nn.Module,
    optimizers: Optional[Union[Optimizer, Sequence[Optimizer]]],
    units: Sequence[FreezeUnit],
) -> list[torch.nn.Parameter]:
    """Freeze ``units``: each parameter all of whose names lie in them leaves the optimizers' param groups and
    ``optimizer.state``, loses its ``.grad`` and stops requiring grad. Returns the parameters newly frozen."""
    params = list(parameters_to_freeze(model, units).values())
    for optimizer in ensure_tuple(optimizers) if optimizers is not None else ():
        remove_params(optimizer, params)
    newly_frozen = [p for p in params if p.requires_grad]
    for param in params:
        param.requires_grad_(False)
        param.grad = None
    return newly_frozen


def freeze_layers(
    model: torch.nn.Module,
    optimizers: Optional[Union[Optimizer, Sequence[Optimizer]]],
    current_duration: float,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
    granularity: Granularity = 'leaf',
    schedule: Optional[FreezeSchedule] = None,
) -> tuple[int, float]:
    """Freeze the first units of ``model`` in place, as many as the schedule asks for at ``current_duration``.

    With the default options this freezes exactly the layers that
    :func:`composer.algorithms.layer_freezing.freeze_layers` freezes on models without tied weights, but frees
    their optimizer state and gradients too. Frozen units stay frozen: a later call with a smaller fraction
    does not unfreeze them.

    Args:
        model: the model (a Composer model, DDP-wrapped or not, or a plain module).
        optimizers: the optimizer(s) training ``model``; ``None`` only changes ``requires_grad``.
        current_duration: the fraction of training completed, in ``[0, 1]``.
        freeze_start: the fraction of training to run before freezing begins.
        freeze_level: the fraction of freezable units frozen at the end of training.
        granularity: ``'leaf'`` (every module with parameters, Composer's) or ``'block'`` (the embeddings,
            then each repeated block; what follows the blocks is never frozen).
        schedule: ``schedule(elapsed, freeze_start, freeze_level) -> fraction``; :func:`linear_schedule` if None.

    Returns:
        ``(freeze_depth, freeze_percentage)``: how many units the schedule freezes now, and the schedule's fraction,
        as Composer's function returns them.
    """
    _check_arguments(freeze_start, freeze_level, granularity, schedule)
    freeze_depth, freeze_percentage, _ = _freeze_by_schedule(
        model, optimizers, current_duration, freeze_start, freeze_level, granularity, schedule
    )
    return freeze_depth, freeze_percentage


def _freeze_by_schedule(
    model: torch.nn.Module,
    optimizers: Optional[Union[Optimizer, Sequence[Optimizer]]],
    current_duration: float,
    freeze_start: float,
    freeze_level: float,
    granularity: Granularity,
    schedule: Optional[FreezeSchedule],
) -> tuple[int, float, list[FreezeUnit]]:
    """:func:`freeze_layers` without argument checks; also returns the freezable units it found."""
    root = user_module(model)
    units = freezable_units(root, granularity)
    freeze_percentage = (schedule or linear_schedule)(current_duration, freeze_start, freeze_level)
    if not math.isfinite(freeze_percentage):
        raise ValueError(f'schedule returned {freeze_percentage!r} at elapsed={current_duration}; expected a fraction.')
    freeze_depth = min(max(int(freeze_percentage * len(units)), 0), len(units))
    freeze_units(root, optimizers, units[:freeze_depth])
    log.info(
        'Layer freezing (freeze_start=%s, freeze_level=%s): %d of %d %s units frozen (%.1f%%).',
        freeze_start,
        freeze_level,
        freeze_depth,
        len(units),
        granularity,
        freeze_percentage * 100,
    )
    return freeze_depth, freeze_percentage, units


class LayerFreezing(ThawAlgorithm):
    """Progressively freeze a model's layers, earliest first, freeing their optimizer state.

    Freezing starts after ``freeze_start`` of training; the fraction of freezable units frozen then grows linearly
    (or as ``schedule`` says) to ``freeze_level`` at the end of training. It is re-evaluated at every
    :attr:`.Event.EPOCH_END` (``interval='epoch'``, Composer's behaviour) or every ``interval`` batches at
    :attr:`.Event.BATCH_END`, which is what a single-epoch fine-tune needs.

    Frozen parameters leave the optimizer (param groups and ``optimizer.state``), lose their gradients and stop
    requiring grad, so backward does not run through a frozen prefix. Frozen units are saved in checkpoints and
    frozen again on load, before the optimizer state is loaded; resumption is exact.

    Under DDP, :attr:`find_unused_parameters` is ``True`` and freezing only happens after the model is wrapped (or,
    when resuming, before it is wrapped, for units that stay frozen for good), so ranks stay identical. Under FSDP2
    frozen shards leave the optimizer on every rank alike, and both checkpoint formats resume exactly: a sharded
    checkpoint's optimizer state is read after the frozen units are frozen again
    (:mod:`composer_thaw.utils.deferred_optimizer_load`). FSDP1 is refused.

    Args:
        freeze_start: fraction of training to run before freezing begins, in ``[0, 1]``. Default: ``0.5``.
        freeze_level: fraction of freezable units frozen at the end of training, in ``[0, 1]``. Default: ``1.0``.
        granularity: ``'leaf'`` (Composer's: every module with parameters; the last one is never frozen) or
            ``'block'`` (the embeddings, then each repeated block; the modules after the blocks are never frozen).
        interval: ``'epoch'``, or a number of batches between freezing updates.
        schedule: ``schedule(elapsed, freeze_start, freeze_level) -> fraction``; Composer's linear one if None.
        master_weights: ``'fp32'`` keeps the model's low-precision (bf16) weights and gives the units not yet frozen an
            fp32 master copy and fp32 optimizer state (:mod:`composer_thaw.utils.master_weights`). Default: ``None``.
            Freezing a unit frees its masters.
    """

    events = (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD, Event.EPOCH_END, Event.BATCH_END)  # whatever the options
    # What decides the units and when each one freezes: a resume with other values would follow neither schedule.
    resume_fields = ('freeze_start', 'freeze_level', 'granularity', 'interval', 'schedule', 'master_weights')
    master_copies: MasterWeightsOption
    duplicate_advice = 'give one LayerFreezing (its schedule decides everything frozen).'

    def __init__(
        self,
        freeze_start: float = 0.5,
        freeze_level: float = 1.0,
        granularity: Granularity = 'leaf',
        interval: Union[Literal['epoch'], int] = 'epoch',
        schedule: Optional[FreezeSchedule] = None,
        master_weights: Optional[Literal['fp32']] = None,
    ):
        _check_arguments(freeze_start, freeze_level, granularity, schedule)
        self.master_copies = MasterWeightsOption(master_weights)
        if interval != 'epoch' and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval={interval!r} must be 'epoch' or a positive number of batches (an int).")
        self.freeze_start = freeze_start
        self.freeze_level = freeze_level
        self.granularity = granularity
        self.interval = interval
        self.schedule = schedule
        self.master_weights = master_weights
        self._state: Optional[State] = None
        self._units: list[FreezeUnit] = []
        self._units_frozen = 0
        self._loaded_units: Optional[list[str]] = None  # from a checkpoint read before Event.INIT

    @property
    def find_unused_parameters(self) -> bool:
        """DDP must not expect gradients for parameters frozen after it wrapped the model."""
        return True

    def owns(self) -> tuple[Claim, ...]:
        """Freezing only grows, over whatever trains (base parameters and adapters alike): it composes with an
        algorithm that decides once what trains, not with a rotation (see :mod:`composer_thaw.core.compatibility`)."""
        advice = 'LayerFreezing only freezes whole units from the bottom up; drop it, or drop the rotation.'
        return (Claim(BASE_PARAMETERS, 'narrows', advice), Claim(ADAPTERS, 'narrows', advice))

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD):
            return True
        if self.interval == 'epoch':
            return event == Event.EPOCH_END
        return event == Event.BATCH_END and state.timestamp.batch.value % self.interval == 0

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.check_trainer(state)
            # Find the units now, so a model that cannot be frozen fails before training; keep the state so that
            # load_state_dict (which only receives the checkpoint) can re-freeze the model before the optimizer loads.
            self._state = state
            self._units = freezable_units(user_module(state.model), self.granularity)
            self._units_frozen = 0  # a new trainer (this instance may have served another one)
            if self._loaded_units is not None:
                self._refreeze(self._loaded_units)
                self._loaded_units = None
            return
        if event == Event.BEFORE_LOAD:  # a sharded checkpoint holds no state for the parameters frozen by then
            self.master_copies.enable(state.model, state.optimizers)
            defer_optimizer_load(state)
            return
        if event == Event.AFTER_LOAD:
            load_deferred_optimizer(state)
            return
        freeze_depth, freeze_percentage, self._units = _freeze_by_schedule(
            state.model,
            state.optimizers,
            self._elapsed(state),
            self.freeze_start,
            self.freeze_level,
            self.granularity,
            self.schedule,
        )
        self._units_frozen = max(self._units_frozen, freeze_depth)
        model = user_module(state.model)
        logger.log_metrics(
            {
                'layer_freezing/layers_frozen': freeze_depth,
                'layer_freezing/percentage_frozen': freeze_percentage,
                'layer_freezing/trainable_params': sum(p.numel() for p in model.parameters() if p.requires_grad),
                'layer_freezing/optimizer_state_bytes': sum(
                    optimizer_state_bytes(o) for o in ensure_tuple(state.optimizers)
                ),
            }
        )

    def _elapsed(self, state: State) -> float:
        """Elapsed fraction of training; within an epoch too when ``max_duration`` is in epochs and freezing is per
        batch."""
        max_duration = state.max_duration
        if max_duration is None:
            raise RuntimeError('LayerFreezing needs the trainer to have a max_duration.')
        if self.interval != 'epoch' and max_duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
            return state.timestamp.batch.value / (max_duration.value * int(state.dataloader_len))
        return float(state.get_elapsed_duration())  # type: ignore[arg-type]

    def own_state(self) -> dict[str, Any]:
        return {
            'granularity': self.granularity,
            'frozen_units': [unit.name for unit in self._units[: self._units_frozen]],
        }

    def load_own_state(self, state: dict[str, Any]) -> None:
        if state.get('granularity', self.granularity) != self.granularity:
            raise ValueError(
                f'The checkpoint froze units at granularity={state["granularity"]!r}, but this LayerFreezing has '
                f'granularity={self.granularity!r}; use the same granularity to resume.',
            )
        frozen = list(state.get('frozen_units', []))
        if self._state is None:
            self._loaded_units = frozen  # frozen at Event.INIT, once the model is known
        else:
            self._refreeze(frozen)

    def _refreeze(self, unit_names: list[str]) -> None:
        """Freeze the units a checkpoint recorded; they must be a prefix of this model's freezable units."""
        assert self._state is not None
        self._units = freezable_units(user_module(self._state.model), self.granularity)  # after any INIT surgery
        expected = [unit.name for unit in self._units[: len(unit_names)]]
        if unit_names != expected:
            raise ValueError(
                f'The checkpoint froze units {unit_names}, but the first freezable units of this model are {expected}; '
                'resume with the same model and granularity.',
            )
        freeze_units(user_module(self._state.model), self._state.optimizers, self._units[: len(unit_names)])
        self._units_frozen = max(self._units_frozen, len(unit_names))


def estimate_memory(
    model: torch.nn.Module, optimizer: Optimizer, algorithm: LayerFreezing, settings: EstimateSettings
) -> MemoryPlan:
    """For ``thaw estimate``: the state once the schedule reaches ``freeze_level`` (the end of training); before
    freezing starts the run holds the full fine-tuning state."""
    depth, _ = freeze_layers(
        model, optimizer, 1.0, algorithm.freeze_start, algorithm.freeze_level, algorithm.granularity, algorithm.schedule
    )
    return resident_plan(
        optimizer, settings, f'at the end of training ({depth} units frozen); before freezing starts: the full row'
    )
