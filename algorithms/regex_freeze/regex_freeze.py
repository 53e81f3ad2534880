"""RegexFreeze: train exactly the parameters, and the rows of parameters, that patterns name.

Example:
    >>> from composer import Trainer
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> from composer_thaw.regex_freeze import RegexFreeze
    >>> model = tiny_decoder(num_layers=4)
    >>> embeddings = model.model.model.embed_tokens.weight
    >>> before = embeddings.detach().clone()
    >>> freeze = RegexFreeze(trainable=['lm_head', 'model.layers.3', 'model.embed_tokens.weight[:1000]'])
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='2ba',
    ...                   algorithms=[freeze], progress_bar=False)
    >>> trainer.fit()
    >>> embeddings[:1000].equal(before[:1000]), embeddings[1000:].equal(before[1000:])  # rows 1000... stay
    (False, True)
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from composer.algorithms import EMA
from composer.core import Event, State
from composer.loggers import Logger
from torch import nn
from torch.optim import Optimizer

from composer_thaw.core.compatibility import ADAPTERS, BASE_PARAMETERS, Claim
from composer_thaw.core.types import Optimizers, single_optimizer
from composer_thaw.regex_freeze.patterns import (
    SYNTAXES,
    ParameterPattern,
    Selection,
    Syntax,
    parse_patterns,
    select_parameters,
)
from composer_thaw.regex_freeze.row_freezing import RowFreezer, sync_ema_frozen_rows
from composer_thaw.utils.master_weights import MasterWeightsOption
from composer_thaw.utils.memory import EstimateSettings, MemoryPlan, resident_plan
from composer_thaw.utils.optimizer_surgery import add_params, group_index_of, remove_params
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.thaw_algorithm import ThawAlgorithm
from composer_thaw.utils.trainable_checkpoints import install_for_trainer

log = logging.getLogger(__name__)

__all__ = ['RegexFreeze', 'apply_regex_freeze', 'estimate_memory']

# Valid on tiny_decoder('llama', num_layers=4); the conformance suite runs each of them.
EXAMPLES: tuple[dict[str, Any], ...] = (
    {'trainable': ['lm_head', 'model.layers.3']},
    # Two row ranges: under FSDP2 at 2 processes (15261 rows each) the second spans both ranks' shards.
    {'trainable': ['model.embed_tokens.weight[0:100]', 'model.embed_tokens.weight[15200:15300]', 'model.norm']},
    {'frozen': ['model.embed_tokens', 'lm_head']},
)

# Bad configurations and a fragment of the error each gives (on the same model), before anything changes.
BAD_EXAMPLES: tuple[tuple[dict[str, Any], str], ...] = (
    ({'trainable': ['lm_haed']}, "trainable pattern 'lm_haed'"),
    ({'frozen': ['model.layers.9']}, "frozen pattern 'model.layers.9'"),
    ({'trainable': ['model.embed_tokens.weight[30000:40000]']}, 'which has 30522 rows'),
    ({'trainable': ['lm_head.weight[5:5]']}, 'empty row range'),
    ({'trainable': ['lm_head.weight[1:2:3]']}, 'malformed row range'),
)


@dataclass
class _OptimizerRecord:
    """What this module did to one optimizer, so applying again (same or new patterns) is exact."""

    removed_groups: dict[int, int] = field(default_factory=dict)  # id(param) -> param group it was removed from
    row_freezer: Optional[RowFreezer] = None


_RECORDS: weakref.WeakKeyDictionary[Optimizer, _OptimizerRecord] = weakref.WeakKeyDictionary()


def _check_optimizer_holds(
    optimizer: Optional[Optimizer],
    selection: Selection,
    params: dict[str, nn.Parameter],
    record: _OptimizerRecord,
) -> None:
    """Raise before any change if a tensor to train cannot be trained by ``optimizer``."""
    partial = [name for name, t in selection.items() if t.partially_trainable]
    if optimizer is None:
        if partial:
            raise ValueError(
                f'Row ranges need the optimizer (to keep frozen rows exact through weight decay), but optimizers=None; '
                f'partially trainable: {", ".join(partial)}. Pass the optimizer to apply_regex_freeze.',
            )
        return
    in_optimizer = group_index_of(optimizer)
    missing = [
        name
        for name, t in selection.items()
        if t.trainable_rows and id(params[name]) not in in_optimizer and id(params[name]) not in record.removed_groups
    ]
    if missing:
        raise ValueError(
            f'These parameters are selected as trainable but are not in the optimizer, so they could not train: '
            f'{", ".join(missing)}. Build the optimizer over all model parameters (Composer does by default) and let '
            'RegexFreeze remove the frozen ones.',
        )


def apply_regex_freeze(
    model: nn.Module,
    optimizers: Optional[Optimizers],
    trainable: Optional[Union[Sequence[str], Sequence[ParameterPattern]]] = None,
    frozen: Optional[Union[Sequence[str], Sequence[ParameterPattern]]] = None,
    syntax: Syntax = 'axolotl',
) -> Selection:
    """Train only what ``trainable`` names (minus what ``frozen`` names); freeze everything else for real.

    Whole frozen tensors get ``requires_grad=False`` and leave the optimizer's param groups with their optimizer
    state. Tensors with trainable row ranges stay in the optimizer (with full-size state); their frozen rows get
    zero gradients and are restored after every optimizer step, so they stay bit-identical under weight decay and
    momentum. Applying again, with the same or other patterns, gives the same result as applying once: tensors
    this function froze earlier return to their original param group (with fresh optimizer state) if now trainable.

    Everything is decided, and every error raised, before the model or optimizer is changed.

    Args:
        model: a Hugging Face model, or it wrapped by Composer and/or DDP; patterns match the names of
            :func:`~composer_thaw.utils.parameter_selection.user_module` (e.g. ``model.layers.3.mlp.up_proj.weight``).
        optimizers: the optimizer (one) that trains ``model``; ``None`` is allowed when no pattern has a row range.
        trainable: patterns of what to train (``None``: everything), see :mod:`composer_thaw.regex_freeze.patterns`.
        frozen: patterns applied afterwards, freezing tensors or rows ("everything but X" is ``frozen=['X']``).
        syntax: ``'axolotl'`` (default; axolotl's ``unfrozen_parameters``) or ``'regex'`` (``re.search``).

    Returns:
        The :class:`~composer_thaw.regex_freeze.patterns.Selection` applied (trainable rows per tensor, counts).

    Raises:
        ValueError: a pattern matching no parameter, a bad row range, a trainable tensor outside the optimizer.
    """
    optimizer = single_optimizer(optimizers)
    root = user_module(model)
    selection = select_parameters(root, trainable, frozen, syntax)
    params = dict(root.named_parameters())
    record = _RECORDS.get(optimizer, _OptimizerRecord()) if optimizer is not None else _OptimizerRecord()
    _check_optimizer_holds(optimizer, selection, params, record)

    # Decided and checked: now change the model and the optimizer.
    if record.row_freezer is not None:
        record.row_freezer.remove()
        record.row_freezer = None
    frozen_params = [params[name] for name, t in selection.items() if t.fully_frozen]
    trainable_params = [params[name] for name, t in selection.items() if t.trainable_rows]
    for param in frozen_params:
        param.requires_grad_(False)
        param.grad = None
    for param in trainable_params:
        param.requires_grad_(True)
    if optimizer is not None:
        record.removed_groups.update(remove_params(optimizer, frozen_params))
        returning: dict[int, list[nn.Parameter]] = {}
        for param in trainable_params:
            group = record.removed_groups.pop(id(param), None)
            if group is not None:
                returning.setdefault(group, []).append(param)
        if returning:
            order = {id(p): index for index, p in enumerate(root.parameters())}
            add_params(optimizer, returning, order)
        partial = {params[name]: t.frozen_rows for name, t in selection.items() if t.partially_trainable}
        if partial:
            record.row_freezer = RowFreezer(optimizer, partial)
            record.row_freezer.install()
        _RECORDS[optimizer] = record

    if selection.trainable_params == 0:
        warnings.warn(
            'RegexFreeze left nothing trainable: every parameter is frozen, so training will not change the model. '
            f'trainable={_texts(trainable)}, frozen={_texts(frozen)}.',
            UserWarning,
            stacklevel=2,
        )
    log.info(
        'RegexFreeze: training %d of %d parameters (%.2f%%) in %d tensors, %d of them partially.',
        selection.trainable_params,
        selection.total_params,
        100 * selection.trainable_fraction,
        sum(1 for t in selection.values() if t.trainable_rows),
        sum(1 for t in selection.values() if t.partially_trainable),
    )
    return selection


def _texts(patterns: Optional[Sequence[Any]]) -> Optional[list[str]]:
    if patterns is None:
        return None
    return [p.text if isinstance(p, ParameterPattern) else p for p in patterns]


def _frozen_rows_by_param(model: nn.Module, selection: Selection) -> dict[nn.Parameter, tuple[tuple[int, int], ...]]:
    params = dict(user_module(model).named_parameters())
    return {params[name]: t.frozen_rows for name, t in selection.items() if t.frozen_rows and name in params}


class RegexFreeze(ThawAlgorithm):
    """Train exactly the parameters (and tensor rows) that patterns name; everything else is frozen for real.

    At :attr:`.Event.INIT` it only takes note of the model and optimizer, so that surgery algorithms running at
    INIT (Composer's Factorize, LoRAInject), wherever they sit in the list, have changed the model first. It
    freezes at :attr:`.Event.BEFORE_LOAD` (after FSDP2 sharded the model, and before a sharded checkpoint is
    read, which needs the optimizer to hold exactly the checkpoint's trainable tensors), again when its
    checkpoint state is loaded (Composer loads algorithm state after the model weights and before the optimizer
    state) and at :attr:`.Event.AFTER_LOAD`. All come before DDP wraps the model and before the first optimizer
    step, and applying again is idempotent. Under FSDP2 row ranges are global row indices; each rank keeps the
    frozen rows of its own shard. With Composer's EMA it also keeps EMA's copy of frozen rows exact at the
    events where EMA updates or swaps weights.

    Args:
        trainable: patterns of what to train; ``None`` (default) means every parameter, for use with ``frozen``.
            E.g. ``['lm_head', 'model.layers.3', 'model.embed_tokens.weight[32000:32010]']``.
        frozen: patterns applied after ``trainable`` that freeze whole tensors, or rows with a range.
        syntax: ``'axolotl'`` (default): axolotl's ``unfrozen_parameters`` rules (a ``.`` is literal, ``re.match``
            from the start of the name); ``'regex'``: plain Python regexes with ``re.search``.
        checkpoint_trainable_only: Composer checkpoints hold the trainable tensors, their optimizer state and the
            algorithm state, plus a fingerprint of the frozen tensors, which a resume takes from the model as built
            and checks (:mod:`~composer_thaw.utils.trainable_checkpoints`). Not under FSDP2. Default: full checkpoints.
        master_weights: ``'fp32'`` keeps the model's low-precision (bf16) weights and gives the trainable tensors an
            fp32 master copy and fp32 optimizer state (:mod:`composer_thaw.utils.master_weights`). Default: ``None``.
            Frozen tensors and frozen rows stay bit-identical in the weights' dtype.

    Logs ``regex_freeze/trainable_params``, ``regex_freeze/total_params`` and ``regex_freeze/trainable_fraction``.
    """

    _EMA_SYNC_EVENTS = frozenset(
        {
            Event.BATCH_END,
            Event.EPOCH_END,
            Event.BATCH_CHECKPOINT,
            Event.EPOCH_CHECKPOINT,
            Event.ITERATION_CHECKPOINT,
            Event.EVAL_START,
            Event.FIT_END,
        }
    )
    # every event it acts at
    events = (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD, *sorted(_EMA_SYNC_EVENTS, key=lambda e: e.value))
    # The selection, whose optimizer state the checkpoint holds, and the fp32 masters of what trains.
    resume_fields = ('trainable', 'frozen', 'syntax', 'master_weights')
    master_copies: MasterWeightsOption
    duplicate_advice = 'give one RegexFreeze with all the trainable and frozen patterns.'

    def __init__(
        self,
        trainable: Optional[list[str]] = None,
        frozen: Optional[list[str]] = None,
        syntax: Syntax = 'axolotl',
        checkpoint_trainable_only: bool = False,
        master_weights: Optional[Literal['fp32']] = None,
    ):
        self.master_copies = MasterWeightsOption(master_weights)
        if syntax not in SYNTAXES:
            raise ValueError(f'syntax={syntax!r} is not a pattern syntax; choose one of {list(SYNTAXES)}.')
        if trainable is None and not frozen:
            raise ValueError(
                'RegexFreeze needs patterns: give trainable=[...] (what to train) and/or frozen=[...] (what not to '
                f'train); got trainable={trainable!r}, frozen={frozen!r}.',
            )
        self._trainable_patterns: Optional[tuple[ParameterPattern, ...]] = (
            None if trainable is None else parse_patterns(trainable, syntax, 'trainable')
        )
        self._frozen_patterns = parse_patterns(frozen, syntax, 'frozen')
        self.trainable = None if trainable is None else list(trainable)
        self.frozen = None if frozen is None else list(frozen)
        self.syntax = syntax
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.master_weights = master_weights
        self.selection: Optional[Selection] = None
        self._model: Optional[nn.Module] = None
        self._optimizers: Optional[Optimizers] = None
        self._frozen_rows: dict[nn.Parameter, tuple[tuple[int, int], ...]] = {}
        self._syncs_ema = False  # whether Composer's EMA runs alongside: then its copies of frozen rows are corrected

    def owns(self) -> tuple[Claim, ...]:
        """Its patterns decide once which parameters train, adapters included (see
        :mod:`composer_thaw.core.compatibility`); ``trains`` are its trainable patterns."""
        trains = tuple(self.trainable or ())
        return (Claim(BASE_PARAMETERS, 'sets', trains=trains), Claim(ADAPTERS, 'sets', trains=trains))

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD):
            return True
        return self._syncs_ema and event in self._EMA_SYNC_EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        if event == Event.INIT:
            self.check_trainer(state)
            frozen = self.checkpoint_trainable_only
            install_for_trainer(state, self, frozen, default=False, frozen=lambda: self._fully_frozen())
            self._model, self._optimizers = state.model, state.optimizers
            return None
        if event == Event.BEFORE_LOAD:
            self._apply_to(state.model, state.optimizers)
            return None
        if event == Event.AFTER_LOAD:
            self._apply_to(state.model, state.optimizers)  # again (idempotent): a checkpoint's surgery may have run
            self._syncs_ema = bool(self._frozen_rows) and any(isinstance(a, EMA) for a in state.algorithms)
            assert self.selection is not None
            logger.log_metrics(
                {
                    'regex_freeze/trainable_params': self.selection.trainable_params,
                    'regex_freeze/total_params': self.selection.total_params,
                    'regex_freeze/trainable_fraction': self.selection.trainable_fraction,
                }
            )
            return None
        sync_ema_frozen_rows(state.model, state.algorithms, self._frozen_rows)
        return None

    def _apply_to(self, model: nn.Module, optimizers: Optional[Optimizers]) -> None:
        selection = apply_regex_freeze(model, optimizers, self._trainable_patterns, self._frozen_patterns, self.syntax)
        self.selection = selection
        self._model, self._optimizers = model, optimizers
        self._frozen_rows = _frozen_rows_by_param(model, selection)
        self.master_copies.enable(model, optimizers)

    def _fully_frozen(self) -> list[nn.Parameter]:
        """The whole tensors the selection freezes (what trainable-only checkpoints leave out)."""
        if self.selection is None or self._model is None:
            return []
        params = dict(user_module(self._model).named_parameters())
        return [params[name] for name, t in self.selection.items() if t.fully_frozen and name in params]

    def own_state(self) -> dict[str, Any]:
        return {'trainable_rows': self.selection.as_plain_data() if self.selection is not None else None}

    def load_own_state(self, state: dict[str, Any]) -> None:
        saved = state.get('trainable_rows')
        if self._model is None:
            return  # not part of a Trainer yet: Event.AFTER_LOAD will apply it
        current = select_parameters(
            user_module(self._model), self._trainable_patterns, self._frozen_patterns, self.syntax
        ).as_plain_data()
        if saved is not None and saved != current:
            raise ValueError(_selection_mismatch(saved, current))
        # Model weights are loaded before algorithm state and the optimizer state after it; re-applying makes sure
        # the optimizer's structure matches the checkpoint's (idempotent when nothing changed).
        self._apply_to(self._model, self._optimizers)


def _selection_mismatch(saved: dict[str, list[list[int]]], current: dict[str, list[list[int]]]) -> str:
    differences = []
    for name in sorted(set(saved) | set(current), key=lambda n: (n not in current, n)):
        before, after = saved.get(name), current.get(name)
        if before != after:
            differences.append(f'{name}: checkpoint {before or "frozen"}, now {after or "frozen"}')
    shown = '; '.join(differences[:5]) + (f'; and {len(differences) - 5} more' if len(differences) > 5 else '')
    return (
        'RegexFreeze: the checkpoint was trained with a different selection of trainable parameters than these '
        f'patterns give ({shown}), so its optimizer state does not fit. Resume with the patterns it was trained '
        'with, or load only its weights (Trainer(load_weights_only=True), recipe key load_weights_only: true) to '
        'start a new phase with new patterns.'
    )


def estimate_memory(
    model: nn.Module, optimizer: Optimizer, algorithm: RegexFreeze, settings: EstimateSettings
) -> MemoryPlan:
    """For ``thaw estimate``: what the selection trains (a tensor with a row range keeps full-size state, as in a
    run)."""
    apply_regex_freeze(model, optimizer, algorithm.trainable, algorithm.frozen, algorithm.syntax)
    return resident_plan(optimizer, settings)
