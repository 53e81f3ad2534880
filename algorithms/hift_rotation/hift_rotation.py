"""HiFT: hierarchical full-parameter fine-tuning, one group of units trained per step, the others' state offloaded.

:class:`GroupRotation` is the functional core and works in any training loop; :class:`HiFTRotation` is the
Composer algorithm around it.

Example:
    In any loop:

    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import load_tokenizer, tiny_decoder
    >>> model = tiny_decoder(num_layers=2).model  # a plain Hugging Face LlamaForCausalLM
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> rotation = GroupRotation(model, optimizer, group_size=2, strategy='down2up')
    >>> for batch in python_topics_loader(load_tokenizer(), max_blocks=12):
    ...     rotation.before_step()          # switches groups at optimizer-step boundaries
    ...     print(rotation.active_names)
    ...     model(**batch).loss.backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad(set_to_none=True)
    ['model.embed_tokens', 'model.layers.0']
    ['model.layers.1', 'model.norm']
    ['lm_head', 'model.embed_tokens']

    With Composer:

    >>> from composer import Trainer
    >>> model = tiny_decoder(num_layers=2)
    >>> rotation = HiFTRotation(group_size=1, strategy='random', always_trainable=['lm_head'])
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer, max_blocks=8),
    ...                   max_duration='2ba', algorithms=[rotation], progress_bar=False)
    >>> trainer.fit()
    >>> trainer.state.timestamp.batch.value
    2

Why one module: the functional core (:class:`GroupRotation`) and the Composer algorithm around it share the
option checks and the checkpoint layout, as Composer's own algorithm modules keep both in one file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from composer.core import Event, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn
from torch.optim import Optimizer

from composer_thaw.core.compatibility import ADAPTERS, BASE_PARAMETERS, Claim
from composer_thaw.core.types import single_optimizer
from composer_thaw.hift_rotation.memory import estimate_memory  # found next to the class, as EXAMPLES are
from composer_thaw.hift_rotation.queue import STRATEGIES, GroupQueue, Strategy
from composer_thaw.hift_rotation.units import RotationPlan, plan_rotation
from composer_thaw.utils.adapters import has_adapters
from composer_thaw.utils.deferred_optimizer_load import defer_optimizer_load, load_deferred_optimizer
from composer_thaw.utils.master_weights import MasterWeightsMode, MasterWeightsOption
from composer_thaw.utils.offloading import OffloadedTensor
from composer_thaw.utils.optimizer_surgery import offload_state, optimizer_state_bytes, restore_state
from composer_thaw.utils.parameter_selection import named_parameters, user_module
from composer_thaw.utils.sharding import ShardLayout, full_tensor, is_sharded, local_part
from composer_thaw.utils.thaw_algorithm import ThawAlgorithm

log = logging.getLogger(__name__)

__all__ = ['GroupRotation', 'HiFTRotation', 'apply_hift_rotation', 'check_rotation_options', 'estimate_memory']

# Valid on tiny_decoder('llama', num_layers=4): units embed_tokens, layers.0-3, norm, lm_head (indices 0..6).
EXAMPLES: tuple[dict[str, Any], ...] = (
    {'group_size': 2, 'strategy': 'down2up'},
    {'strategy': 'random', 'steps_per_group': 2, 'lr_per_pass': True},
    {'group_size': 1, 'strategy': 'up2down', 'always_trainable': ['embed_tokens', 'lm_head'], 'freeze': [5]},
)

# Errors only a model can reveal: (kwargs, fragment of the message).
BAD_EXAMPLES: tuple[tuple[dict[str, Any], str], ...] = (
    ({'group_size': 8}, 'group_size=8 is larger than the model'),
    ({'freeze': [7]}, 'freeze index 7 is out of range'),
    ({'always_trainable': ['no_such_unit']}, "always_trainable entry 'no_such_unit' matches no unit"),
    ({'groups': ['embed_tokens', 'no_such_module', '.*']}, "groups entry 'no_such_module' matches no"),
)

# Options that decide the rotation's queue and position; a checkpoint resumes only with the same values.
_ROTATION_OPTIONS = ('group_size', 'strategy', 'steps_per_group', 'freeze', 'always_trainable', 'groups', 'lora')
_OFFLOAD_DEVICE = 'cpu'


def _check_int(name: str, value: Any, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name}={value!r} must be an integer >= {minimum} ({meaning}).')
    if value < minimum:
        raise ValueError(f'{name}={value!r} must be >= {minimum} ({meaning}).')


def _check_list(name: str, value: Any, item_type: type, meaning: str) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, item_type) for v in value):
        raise TypeError(f'{name}={value!r} must be None or a list of {item_type.__name__} ({meaning}).')


def check_rotation_options(
    group_size: Any = 1,
    strategy: Any = 'down2up',
    steps_per_group: Any = 1,
    freeze: Any = None,
    always_trainable: Any = None,
    groups: Any = None,
    lora: Any = False,
    offload: Any = True,
    lr_per_pass: Any = False,
) -> None:
    """Check the options that need no model; raise ``TypeError``/``ValueError`` naming the argument."""
    _check_int('group_size', group_size, 1, "units per group, HiFT's group_element")
    if strategy not in STRATEGIES:
        raise ValueError(f'strategy={strategy!r} is not supported; choose one of {", ".join(map(repr, STRATEGIES))}.')
    _check_int('steps_per_group', steps_per_group, 1, 'optimizer steps before switching to the next group')
    _check_list('freeze', freeze, int, 'unit indices never trained: embeddings 0, first block 1, ...')
    for index in freeze or ():
        if index < 0:
            raise ValueError(f'freeze index {index} is out of range: unit indices start at 0 (the embeddings).')
    _check_list('always_trainable', always_trainable, str, 'regexes on unit names')
    _check_list('groups', groups, str, 'regexes on parameter names, one unit each')
    if groups is not None and not groups:
        raise ValueError('groups=[] is empty: give None (find the units automatically) or at least one regex.')
    for name, value in (('lora', lora), ('offload', offload), ('lr_per_pass', lr_per_pass)):
        if not isinstance(value, bool):
            raise TypeError(f'{name}={value!r} must be true or false.')


def _check_lora(root: nn.Module, lora: bool) -> None:
    adapted = has_adapters(root)
    if lora and not adapted:
        raise ValueError(
            'lora=True rotates over LoRA adapters, but the model has none: add LoRAInject(...) to the algorithms '
            '(any position; HiFTRotation starts after INIT surgery) or call apply_lora first.',
        )
    if not lora and adapted:
        raise ValueError(
            'The model has LoRA adapters (LoRAInject): set lora=True to rotate over them (HiFT lora_tuning mode).',
        )


class GroupRotation:
    """Train one group of units per optimizer step, rotating HiFT's queue; inactive groups' state is offloaded.

    Construction checks everything against the model first (on error nothing is changed), then freezes all but the
    first group: inactive parameters stop requiring grad, lose their gradient and (with ``offload``) their
    ``optimizer.state`` entries move to a separate store on the CPU (pinned, non-blocking copies from a GPU).
    Parameters stay in their param groups; an optimizer skips parameters without a gradient, so nothing else changes.

    Call :meth:`before_step` before the forward pass of every optimizer step (all microbatches of a step see the same
    group). Groups switch there, every ``steps_per_group`` steps.

    Args:
        model: the model (Composer model, DDP-wrapped or not, or a plain module).
        optimizer: the one optimizer training it.
        group_size: units per group (HiFT's ``group_element``).
        strategy: ``'down2up'``, ``'up2down'`` or ``'random'`` (a new order every pass).
        steps_per_group: optimizer steps per group before switching (BAdam's interval; HiFT uses 1).
        freeze: unit indices never trained (HiFT's ``freeze_layers``: embeddings 0, first block 1, ...).
        always_trainable: regexes on unit names; matching units train at every step (LISA-style).
        groups: regexes on parameter names, one unit each, replacing the automatic units.
        lora: rotate over LoRA adapters injected by ``LoRAInject`` (required when the model has them).
        offload: move inactive groups' optimizer state off ``optimizer.state`` (to CPU memory); if ``False`` it stays
            in the optimizer (the result is bit-identical, only memory differs).
        lr_per_pass: hold the learning rate constant within a pass at the schedule's value at the pass's first step.
        seed: seeds the ``random`` strategy; use the same on every rank.
        master_weights: ``'fp32'``: low-precision weights with an fp32 master copy for every tensor the rotation
            trains, stepped while its group is active and otherwise kept with the group's optimizer state (on the
            host with ``offload``) (:mod:`composer_thaw.utils.master_weights`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Union[Optimizer, Sequence[Optimizer]],
        group_size: int = 1,
        strategy: Strategy = 'down2up',
        steps_per_group: int = 1,
        freeze: Optional[Sequence[int]] = None,
        always_trainable: Optional[Sequence[str]] = None,
        groups: Optional[Sequence[str]] = None,
        lora: bool = False,
        offload: bool = True,
        lr_per_pass: bool = False,
        seed: int = 0,
        master_weights: Optional[MasterWeightsMode] = None,
    ):
        check_rotation_options(
            group_size, strategy, steps_per_group, freeze, always_trainable, groups, lora, offload, lr_per_pass
        )
        self.master_copies = MasterWeightsOption(master_weights)
        found = single_optimizer(optimizer)
        if found is None:
            raise ValueError('HiFT rotation needs the optimizer that trains the model; got none.')
        self.optimizer: Optimizer = found
        root = user_module(model)
        _check_lora(root, lora)
        self.plan: RotationPlan = plan_rotation(root, self.optimizer, group_size, freeze, always_trainable, groups)

        # ---- from here on nothing fails on user input ----
        self.steps_per_group = steps_per_group
        self.offload = offload
        self.lr_per_pass = lr_per_pass
        named = named_parameters(root)
        self.unit_params: list[list[nn.Parameter]] = [[named[n] for n in u.parameter_names] for u in self.plan.units]
        self.names: dict[int, str] = {id(p): name for name, p in named.items()}
        self.queue = GroupQueue(self.plan.rotating, group_size, strategy, seed)
        self.steps_started = 0
        self.offloaded: dict[int, dict[str, Any]] = {}
        self.held_lrs: Optional[list[Any]] = None
        self._scheduled_lrs: Optional[list[Any]] = None
        self._pass_starts = False
        self.active: tuple[int, ...] = ()
        self._switch()
        # A group's masters are parked with its optimizer state while it waits for its next visit.
        self.master_copies.enable(model, self.optimizer, park_device=_OFFLOAD_DEVICE if offload else None)
        self._hook = self.optimizer.register_step_post_hook(self._after_optimizer_step) if lr_per_pass else None

    # ---- what is where ----
    def _params(self, units: Sequence[int]) -> list[nn.Parameter]:
        return [p for i in units for p in self.unit_params[i]]

    @property
    def managed_params(self) -> list[nn.Parameter]:
        """The parameters this rotation switches on and off: rotating and frozen units."""
        return self._params(self.plan.rotating + self.plan.frozen)

    @property
    def active_params(self) -> list[nn.Parameter]:
        """Parameters that train this step: the active group and the always-trainable units."""
        return self._params(self.active + self.plan.always)

    @property
    def active_names(self) -> list[str]:
        return self.plan.names(self.active)

    # ---- switching ----
    def _switch(self) -> None:
        group, new_pass = self.queue.next_group()
        self.active = group
        self._pass_starts |= new_pass
        self._place()

    def _place(self) -> None:
        """Make the active group the only trainable one: leaving parameters lose grads and state, entering ones get
        their state back. Idempotent."""
        active = {id(p) for p in self._params(self.active)}
        inactive = [p for p in self.managed_params if id(p) not in active]
        for param in inactive:
            param.requires_grad_(False)
            param.grad = None
        if self.offload:
            self.offloaded.update(offload_state(self.optimizer, inactive, _OFFLOAD_DEVICE))
        entering = self._params(self.active)
        restore_state(self.optimizer, entering, self.offloaded)
        for param in entering:
            param.requires_grad_(True)
        self.master_copies.sync()  # the leaving group's masters are parked, the entering group's come back

    def apply_flags(self) -> None:
        """Only the active group's (and always-trainable units') parameters require grad."""
        active = {id(p) for p in self._params(self.active)}
        for param in self.managed_params:
            param.requires_grad_(id(param) in active)

    def require_grad_everywhere(self) -> None:
        """Make every rotating parameter require grad (before DDP wraps the model, so DDP registers them all);
        :meth:`before_step` freezes the inactive ones again."""
        for param in self._params(self.plan.rotating):
            param.requires_grad_(True)

    def before_step(self) -> None:
        """Call once per optimizer step, before its first forward pass: switch groups when due, hold the lr."""
        if self.steps_started > 0 and self.steps_started % self.steps_per_group == 0:
            self._switch()
        else:
            self.apply_flags()
        if self._pass_starts:
            self.held_lrs = [group['lr'] for group in self.optimizer.param_groups]
            self._pass_starts = False
        if self.lr_per_pass and self.held_lrs is not None:
            self._scheduled_lrs = [group['lr'] for group in self.optimizer.param_groups]
            for group, lr in zip(self.optimizer.param_groups, self.held_lrs):
                group['lr'] = lr
        self.steps_started += 1

    def _after_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Give the schedule back its own value, so schedulers that read ``group['lr']`` keep their course."""
        if self._scheduled_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._scheduled_lrs):
                group['lr'] = lr
            self._scheduled_lrs = None

    def close(self) -> None:
        """Remove the optimizer hook (``lr_per_pass``)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---- measurements ----
    def offloaded_bytes(self) -> int:
        total = 0
        for state in self.offloaded.values():
            for value in state.values():
                tensor = value.tensor if isinstance(value, OffloadedTensor) else value
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def metrics(self) -> dict[str, float]:
        masters = self.master_copies.masters
        return {
            'pass': self.queue.passes,
            'active_unit': self.active[0],
            'trainable_params': sum(p.numel() for p in self.active_params),
            'optimizer_state_bytes': optimizer_state_bytes(self.optimizer),
            'offloaded_state_bytes': self.offloaded_bytes(),
            'master_weight_bytes': masters.master_bytes() if masters else 0,
            'offloaded_master_bytes': masters.offloaded_bytes() if masters else 0,
        }

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        """Rotation position, queue, generator, held learning rates and the offloaded optimizer state (CPU tensors).

        Offloaded state is saved whole (gathered from every rank under FSDP2, so every rank calls this together);
        :meth:`load_state_dict` gives each rank its own rows back.
        """
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # offloaded copies are non-blocking
        offloaded: dict[str, dict[str, Any]] = {}
        devices: dict[str, dict[str, str]] = {}
        for key, state in self.offloaded.items():  # the same order on every rank: gathering is collective
            name = self.names[key]
            offloaded[name], devices[name] = {}, {}
            for field, value in state.items():
                if isinstance(value, OffloadedTensor):
                    offloaded[name][field], devices[name][field] = value.whole(), str(value.device)
                else:
                    offloaded[name][field] = full_tensor(value) if isinstance(value, torch.Tensor) else value
                    if isinstance(value, torch.Tensor):
                        devices[name][field] = str(value.device)
        return {
            'units': [unit.name for unit in self.plan.units],
            'queue': self.queue.state_dict(),
            'steps_started': self.steps_started,
            'active': list(self.active),
            'held_lrs': self.held_lrs,
            'offloaded_state': offloaded,
            'offloaded_devices': devices,
            'with_optimizer_state': [self.names[id(p)] for p in self.optimizer.state if id(p) in self.names],
            **self.master_copies.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`, before the optimizer's own state is loaded.

        Parameters that had optimizer state at save time require grad until the optimizer is loaded (so
        ``torch.distributed.checkpoint`` loads their state) and no others; call :meth:`before_step` (or
        :meth:`require_grad_everywhere` under DDP) afterwards.
        """
        units = [unit.name for unit in self.plan.units]
        if list(state['units']) != units:
            raise ValueError(
                f"The checkpoint rotated over units {state['units']}, but this model's units are {units}; resume with "
                'the same model, groups and freeze options.',
            )
        by_name = {self.names[id(param)]: param for param in self.managed_params}
        with_state = set(state['with_optimizer_state'])
        self.offloaded.clear()
        for param in self.managed_params:
            if self.names[id(param)] not in with_state:
                self.optimizer.state.pop(param, None)
        for name, saved in state['offloaded_state'].items():
            param = by_name[name]
            devices = state['offloaded_devices'].get(name, {})
            restored = {}
            for field, value in saved.items():
                if not isinstance(value, torch.Tensor) or field not in devices:
                    restored[field] = value
                    continue
                # Saved whole; under FSDP2 each rank keeps its own rows, laid out as the parameter is.
                shaped_like_param = is_sharded(param) and value.shape == param.shape
                local = local_part(value, param) if shaped_like_param else value
                layout = ShardLayout.of(param) if shaped_like_param else None
                if torch.device(devices[field]) != local.device:
                    restored[field] = OffloadedTensor(local, torch.device(devices[field]), layout)
                else:
                    restored[field] = layout.wrap(local) if layout is not None else local
            self.offloaded[id(param)] = restored
        self.queue.load_state_dict(state['queue'])
        self.steps_started = int(state['steps_started'])
        self.active = tuple(int(i) for i in state['active'])
        self.held_lrs = state['held_lrs']
        self._pass_starts = False
        for param in self.managed_params:
            param.requires_grad_(self.names[id(param)] in with_state)
            param.grad = None
        self.master_copies.load_state_dict(state)


def apply_hift_rotation(
    model: nn.Module,
    optimizers: Union[Optimizer, Sequence[Optimizer]],
    **options: Any,
) -> GroupRotation:
    """Start HiFT on ``model`` without a Trainer: the first group trains, the others are frozen and offloaded.

    Returns the :class:`GroupRotation`; call its ``before_step()`` before every optimizer step (forward and
    backward of all microbatches of that step come after it). ``options`` are :class:`GroupRotation`'s.

    Example:
        >>> from composer_thaw.datasets.builtin import python_topics_loader
        >>> from composer_thaw.models.builtin import tiny_decoder
        >>> model = tiny_decoder(num_layers=2)  # a Composer model here; a plain module works too
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> rotation = apply_hift_rotation(model, optimizer, group_size=2, strategy='up2down')
        >>> for batch in python_topics_loader(model.tokenizer, max_blocks=8):
        ...     rotation.before_step()
        ...     model.loss(model(batch), batch).backward()
        ...     optimizer.step(); optimizer.zero_grad()
        >>> rotation.active_names
        [...]
    """
    return GroupRotation(model, optimizers, **options)


_RESTRICT_ADVICE = (
    'Restrict the rotation instead: HiFTRotation(freeze=[unit indices]) leaves units out, always_trainable=[...] keeps '
    'units on, groups=[regexes] names the groups; with LoRA adapters set lora=True (LoRAInject + '
    'HiFTRotation(lora=True) rotates over the adapters).'
)


class HiFTRotation(ThawAlgorithm):
    """HiFT as a Composer algorithm: all parameters train, one group of units per step, the rest offloaded.

    Units are found automatically (embeddings, each repeated block, each module after the blocks) or given as
    ``groups`` regexes. At :attr:`.Event.INIT` it checks the other algorithms and the Trainer's sharding (FSDP1 is
    refused, FSDP2 works, with checkpoints in either format). At :attr:`.Event.BEFORE_LOAD`
    (after all INIT surgery, e.g. ``LoRAInject``) the options are checked against the model and the first group is
    activated; at every :attr:`.Event.BATCH_START` the group switches when due, so all microbatches of a step train
    the same group. Checkpoints carry the rotation position, queue, generator, held learning rates and the offloaded
    optimizer state: a resumed run is bit-identical.

    Under DDP :attr:`find_unused_parameters` is ``True`` and every rotating parameter requires grad when the model is
    wrapped (:attr:`.Event.AFTER_LOAD`), so DDP all-reduces each group once it is active.

    Args:
        group_size: units per group (HiFT's ``group_element``). Default: ``1``.
        strategy: ``'down2up'`` (embeddings first), ``'up2down'`` or ``'random'`` (a new order every pass, the same on
            every rank). Default: ``'down2up'``.
        steps_per_group: optimizer steps before switching (BAdam's ``switch_block_every``; HiFT uses 1). Default: ``1``.
        freeze: unit indices never trained (HiFT's ``freeze_layers``: embeddings 0, first block 1, ...).
        always_trainable: regexes on unit names; matching units train at every step and leave the rotation
            (LISA keeps the embeddings and head on).
        groups: regexes on parameter names, one unit each, replacing the automatic units.
        lora: rotate over the adapters ``LoRAInject`` injected (HiFT's ``lora_tuning``). Default: ``False``.
        offload: keep inactive groups' optimizer state out of the optimizer, in CPU memory. Default: ``True``.
        lr_per_pass: hold the learning rate constant within a pass at the schedule's value at the pass's first step
            (the schedule keeps its length and still decays to its end). Default: ``False`` (Composer's per-step
            schedule).
        master_weights: ``'fp32'`` keeps the model's low-precision (bf16) weights and gives every tensor the rotation
            trains an fp32 master copy and fp32 optimizer state; an inactive group's masters wait with its optimizer
            state (offloaded to the host with ``offload``), so no update below bf16's resolution is lost between
            visits (:mod:`composer_thaw.utils.master_weights`). Default: ``None``.
    """

    events = (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD, Event.BATCH_START)
    resume_fields = (*_ROTATION_OPTIONS, 'master_weights')  # what shapes the saved units, queue, position, masters
    duplicate_advice = 'give one HiFTRotation (one rotation decides what trains).'

    def __init__(
        self,
        group_size: int = 1,
        strategy: Literal['down2up', 'up2down', 'random'] = 'down2up',
        steps_per_group: int = 1,
        freeze: Optional[list[int]] = None,
        always_trainable: Optional[list[str]] = None,
        groups: Optional[list[str]] = None,
        lora: bool = False,
        offload: bool = True,
        lr_per_pass: bool = False,
        master_weights: Optional[Literal['fp32']] = None,
    ):
        check_rotation_options(
            group_size, strategy, steps_per_group, freeze, always_trainable, groups, lora, offload, lr_per_pass
        )
        self.group_size = group_size
        self.strategy = strategy
        self.steps_per_group = steps_per_group
        self.freeze = freeze
        self.always_trainable = always_trainable
        self.groups = groups
        self.lora = lora
        self.offload = offload
        self.lr_per_pass = lr_per_pass
        self.master_weights = master_weights
        MasterWeightsOption(master_weights)  # checks the value
        self.rotation: Optional[GroupRotation] = None
        self._pending_state: Optional[dict[str, Any]] = None

    @property
    def find_unused_parameters(self) -> bool:
        """DDP must expect parameters without gradients: only one group trains per step."""
        return True

    def owns(self) -> tuple[Claim, ...]:
        """The rotation switches the base parameters on and off, or with ``lora=True`` the adapters (see
        :mod:`composer_thaw.core.compatibility`)."""
        return (Claim(ADAPTERS if self.lora else BASE_PARAMETERS, 'rotates', _RESTRICT_ADVICE),)

    def match(self, event: Event, state: State) -> bool:
        return event in self.events

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:  # only checks, before Composer wraps the model
            self.check_trainer(state)
            return
        if event == Event.BEFORE_LOAD:
            if self.rotation is not None:
                self.rotation.close()
            self.rotation = GroupRotation(
                state.model,
                state.optimizers,
                self.group_size,
                self.strategy,
                self.steps_per_group,
                self.freeze,
                self.always_trainable,
                self.groups,
                self.lora,
                self.offload,
                self.lr_per_pass,
                seed=state.rank_zero_seed,
                master_weights=self.master_weights,
            )
            if self._pending_state is not None:
                self.rotation.load_state_dict(self._pending_state)
                self._pending_state = None
            defer_optimizer_load(state)  # a sharded checkpoint holds state for the group active when it was saved
            return
        assert self.rotation is not None, 'HiFTRotation runs from Event.BEFORE_LOAD on'
        if event == Event.AFTER_LOAD:
            load_deferred_optimizer(state)
            if dist.get_world_size() > 1:
                self.rotation.require_grad_everywhere()  # DDP wraps next; before_step freezes again
            else:
                self.rotation.apply_flags()
            return
        self.rotation.before_step()
        logger.log_metrics({f'hift_rotation/{key}': value for key, value in self.rotation.metrics().items()})

    def own_state(self) -> dict[str, Any]:
        """The rotation's position, queue, offloaded state and masters (:meth:`GroupRotation.state_dict`)."""
        return self.rotation.state_dict() if self.rotation is not None else {}

    def load_own_state(self, state: dict[str, Any]) -> None:
        if 'units' not in state:
            return  # saved before the rotation started
        if self.rotation is None:
            self._pending_state = state  # applied at Event.BEFORE_LOAD, once the model is known
        else:
            self.rotation.load_state_dict(state)
