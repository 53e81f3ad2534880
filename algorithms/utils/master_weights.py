"""Low-precision weights with fp32 master copies only for the tensors that train.

The model's weights stay in their own dtype (bf16 or fp16): the forward and backward passes, gradients and the
checkpointed model are low precision. Each parameter that trains (it is in the optimizer's param groups and
requires grad) gets an fp32 *master* copy, and the optimizer steps the master with fp32 state: for the duration of
every ``optimizer.step()`` the master takes the parameter's place in its param group (and its ``optimizer.state``
entry), with the low-precision gradient cast to fp32 as its gradient; after the step the master is cast back into
the low-precision weight (round to nearest) and the gradient is spent (``None``, as after ``zero_grad``). The
parameter itself is never touched but for that in-place copy, so autograd hooks on it (DDP's all-reduce, gradient
masks) stay in place. Updates smaller than the weight's resolution accumulate in the master until they move the
weight, where pure bf16 training loses them. A frozen parameter never has a master.

A master lives as long as its parameter can train again, that is as long as the parameter is in the optimizer's param
groups. One that stops training but stays there (rotated out by HiFT) keeps its master *parked*: moved to
:attr:`MasterWeights.park_device` (the host, where HiFT offloads the optimizer state) or left where it is, and back,
with the updates it holds below the weight's resolution, when the parameter trains again. Only a parameter removed from
the optimizer (frozen for good, :func:`~composer_thaw.utils.optimizer_surgery.remove_params`) loses its master.

Because the optimizer holds its parameters outside the step, optimizer surgery
(:mod:`composer_thaw.utils.optimizer_surgery`: remove, add, offload and restore state) works unchanged, and
``optimizer.state`` stays keyed by the model's parameters: checkpoints have their usual layout, with fp32 state
(``Optimizer.load_state_dict`` would cast it to the parameter's dtype; a hook gives the saved fp32 state back).
The masters themselves go into the algorithm's checkpoint state, so a resumed run is bit-identical.

Under FSDP2 a master is a DTensor laid out as its weight: each process holds the fp32 rows of its own shard, and
the cast back, like the optimizer step, touches only those (no communication). A checkpoint holds every master
whole (gathered onto the CPU by each rank's :meth:`MasterWeights.state_dict`, a collective), whichever format
Composer writes, and each rank takes its own rows back from it. Parked masters are saved and resumed as well.

One :class:`MasterWeights` serves an optimizer (:func:`attach_master_weights` returns the one already attached),
so algorithms combined on one optimizer (``LoRAInject`` + ``HiFTRotation(lora=True)``) share it. Every algorithm
of this package takes the option ``master_weights='fp32'`` and calls :func:`enable_master_weights`.

Example:
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import load_tokenizer, tiny_decoder
    >>> model = tiny_decoder(num_layers=1).model.to(torch.bfloat16)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    >>> masters = enable_master_weights(model, optimizer, 'fp32')
    >>> batch = next(iter(python_topics_loader(load_tokenizer())))
    >>> model(**batch).loss.backward(); optimizer.step()  # steps the fp32 masters, then casts back
    >>> model.lm_head.weight.dtype, masters.master_of(model.lm_head.weight).dtype
    (torch.bfloat16, torch.float32)
    >>> masters.master_bytes() == 4 * sum(p.numel() for p in model.parameters())  # 4 bytes per trainable element
    True

Why one module: the masters' lifetime (made, parked, dropped), their swap around the optimizer step and their
checkpoint state are one mechanism.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal, Optional, Union, cast

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from composer_thaw.core.types import Optimizers, single_optimizer
from composer_thaw.core.validation import ConfigError
from composer_thaw.utils.offloading import OffloadedTensor, offload_tensor
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.sharding import ShardLayout, full_tensor, is_sharded, local_part, local_tensor

__all__ = [
    'LOW_PRECISION_DTYPES',
    'MASTER_WEIGHTS_CHOICES',
    'MasterWeights',
    'MasterWeightsMode',
    'MasterWeightsOption',
    'attach_master_weights',
    'check_master_weights',
    'enable_master_weights',
    'master_weights_of',
    'release_masters',
]

MasterWeightsMode = Literal['fp32']
MASTER_WEIGHTS_CHOICES: tuple[str, ...] = ('fp32',)
LOW_PRECISION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
_MASTER_DTYPES = {'fp32': torch.float32}

_ATTACHED: weakref.WeakKeyDictionary[Optimizer, MasterWeights] = weakref.WeakKeyDictionary()


def check_master_weights(value: Any) -> None:
    """Raise :class:`~composer_thaw.core.validation.ConfigError` unless ``value`` is ``None`` or a valid mode."""
    if value is not None and value not in MASTER_WEIGHTS_CHOICES:
        choices = ', '.join(repr(choice) for choice in MASTER_WEIGHTS_CHOICES)
        raise ConfigError(
            'master_weights',
            value,
            f'choose None (every tensor trains in its own dtype) or one of {choices} (low-precision weights, fp32 '
            'master copies and optimizer state for the tensors that train).',
        )


@dataclass
class ParkedMaster:
    """The master of a parameter that does not train now but may again (HiFT's inactive groups)."""

    param: nn.Parameter
    master: Union[torch.Tensor, OffloadedTensor]
    offloaded: bool  # parked at MasterWeights.park_device: counted apart from the masters where the weights are

    def restore(self) -> torch.Tensor:
        """The master back where its parameter is (a DTensor again if it was one)."""
        return self.master.restore() if isinstance(self.master, OffloadedTensor) else self.master

    def whole(self) -> torch.Tensor:
        """The whole master (gathered from every rank when sharded: a collective)."""
        if isinstance(self.master, OffloadedTensor):
            return self.master.whole()
        return full_tensor(self.master).cpu() if is_sharded(self.master) else self.master

    def local_bytes(self) -> int:
        tensor = self.master.tensor if isinstance(self.master, OffloadedTensor) else local_tensor(self.master)
        return tensor.numel() * tensor.element_size()


class MasterWeights:
    """fp32 master copies of the low-precision parameters ``optimizer`` trains, stepped in their place.

    Args:
        optimizer: the optimizer; its step and ``load_state_dict`` get hooks (:meth:`install`).
        model: the model, for the parameter names in :meth:`state_dict`.
        dtype: the masters' dtype. Default: ``torch.float32``.

    A parameter trains when it sits in one of the optimizer's param groups, requires grad and has a low-precision
    floating dtype (bf16, fp16); parameters already in fp32 (e.g. LoRA adapters on a bf16 base) are their own
    masters. :meth:`sync` makes the masters follow that set; it runs before every step, and algorithms call it when
    they change what trains. A master whose weight was overwritten from outside (a checkpoint's weights loaded,
    another algorithm's copy) is refreshed from the weight before the next step. Such a write is seen through the
    weight's version counter, as autograd sees in-place changes: any in-place write through the parameter or a view of
    it (``copy_``, ``load_state_dict``, torch's distributed checkpoint, Composer's EMA swap) counts, and costs an
    element-wise comparison once; a step with no such write compares nothing. A write through ``.data``, which
    bypasses the counter, is not seen: call :meth:`refresh` after one.

    :attr:`masters` holds the masters of the parameters that train now; :attr:`parked` those of parameters still in
    the optimizer that do not train now, kept at :attr:`park_device` (``None``: where they are; HiFT with ``offload``
    sets the host).
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, dtype: torch.dtype = torch.float32):
        # The optimizer owns its MasterWeights (through its hooks): a strong reference back would keep both alive.
        self._optimizer = weakref.ref(optimizer)
        self.model = model
        self.dtype = dtype
        self.masters: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self.parked: dict[int, ParkedMaster] = {}
        self.park_device: Optional[torch.device] = None
        self._swapped: list[tuple[dict[str, Any], int, nn.Parameter, torch.Tensor]] = []
        self._handles: list[RemovableHandle] = []
        self._after_others: Optional[RemovableHandle] = None
        self._stepped: list[nn.Parameter] = []
        self._loading: Optional[dict[str, Any]] = None
        self._names: dict[int, str] = {}
        # id(param) -> the weight's version at the masters' last cast into it (or last comparison with it)
        self._versions: dict[int, tuple[int, int, int]] = {}

    @property
    def optimizer(self) -> Optimizer:
        optimizer = self._optimizer()
        if optimizer is None:
            raise RuntimeError('The optimizer these master weights belonged to no longer exists.')
        return optimizer

    # ---- what trains ----
    def trains(self, param: torch.Tensor) -> bool:
        """Whether ``param`` needs a master: trainable and low precision."""
        return param.requires_grad and param.dtype in LOW_PRECISION_DTYPES

    def trainable_params(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for group in self.optimizer.param_groups:
            for param in group['params']:
                if id(param) not in seen and self.trains(param):
                    seen.add(id(param))
                    params.append(param)
        return params

    def _in_optimizer(self) -> set[int]:
        return {id(p) for group in self.optimizer.param_groups for p in group['params']}

    @torch.no_grad()
    def sync(self) -> None:
        """Masters for exactly the parameters that train now: parked ones brought back, new ones from their current
        weights. The masters of parameters that stopped training are parked, those of parameters that left the
        optimizer dropped. Elements of a weight changed since the master's last cast (a checkpoint's weights loaded,
        frozen rows restored) are taken into the master; the others keep the master's precision."""
        if self._swapped:
            return  # inside a step
        if self._after_others is not None:  # hooks installed since (a new RowFreezer) run before it
            self._post_step_hooks().move_to_end(self._after_others.id)
        trainable = self.trainable_params()
        keep = {id(p) for p in trainable}
        in_optimizer = self._in_optimizer()
        self.release([parked.param for key, parked in self.parked.items() if key not in in_optimizer])
        for key, (param, master) in list(self.masters.items()):
            if key not in keep:
                if key in in_optimizer:
                    del self.masters[key]
                    self.parked[key] = self._park(param, master)
                else:
                    self.release([param])
        names: dict[int, str] = {}
        if any(id(param) not in self.masters for param in trainable):
            # Named now, while these are the sharded parameters the optimizer holds: between FSDP2's forward and
            # backward a module may hold an unsharded parameter under the same name.
            names = {id(p): name for name, p in user_module(self.model).named_parameters()}
        for param in trainable:
            entry = self.masters.get(id(param))
            parked = self.parked.pop(id(param), None)
            if parked is not None:
                entry = self.masters[id(param)] = (param, parked.restore())
            if entry is None:
                self.masters[id(param)] = (param, param.detach().to(self.dtype, copy=True))
                self._names[id(param)] = names.get(id(param), '')
                self._versions[id(param)] = self._version_of(param)
            else:
                self._take_back(param, entry[1])

    def _park(self, param: nn.Parameter, master: torch.Tensor) -> ParkedMaster:
        if self.park_device is None:
            return ParkedMaster(param, master, offloaded=False)
        return ParkedMaster(param, offload_tensor(master, self.park_device), offloaded=True)

    @staticmethod
    def _version_of(param: torch.Tensor) -> tuple[int, int, int]:
        """What changes when the weight is written in place: its version counter (and its local shard's, under
        FSDP2), and the shard's storage."""
        local = local_tensor(param)
        return param._version, local._version, local.data_ptr()

    def _take_back(self, param: torch.Tensor, master: torch.Tensor) -> None:
        """Elements of the weight that are not the master's cast (written from outside) go into the master (this
        rank's part of them, when sharded: no communication). Only a weight written since the masters' last cast is
        compared."""
        version = self._version_of(param)
        if self._versions.get(id(param)) == version:
            return
        weight, master = local_tensor(param.detach()), local_tensor(master)
        changed = master.to(weight.dtype) != weight
        if changed.any():
            master[changed] = weight[changed].to(self.dtype)
        self._versions[id(param)] = version

    def refresh(self) -> None:
        """Take into the masters every weight element that differs from its master's cast, written or not since:
        after a write the version counter does not see (through ``.data``)."""
        self._versions.clear()
        self.sync()

    def release(self, params: Iterable[torch.Tensor]) -> None:
        """Drop the masters of ``params``, parked ones included (their weights already hold the masters' last cast):
        for parameters that leave the optimizer for good."""
        for param in params:
            self.masters.pop(id(param), None)
            self.parked.pop(id(param), None)
            self._names.pop(id(param), None)
            self._versions.pop(id(param), None)

    def master_bytes(self) -> int:
        """Bytes of the masters this process holds where the weights are (its shards of them, under FSDP2): those
        that train and those parked without a :attr:`park_device`."""
        active = sum(local_tensor(master).numel() * master.element_size() for _, master in self.masters.values())
        return active + sum(parked.local_bytes() for parked in self.parked.values() if not parked.offloaded)

    def offloaded_bytes(self) -> int:
        """Bytes of the masters parked at :attr:`park_device` (on the host, with HiFT's offloaded state)."""
        return sum(parked.local_bytes() for parked in self.parked.values() if parked.offloaded)

    def master_of(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The master of ``param``: the one stepped in its place, or a parked one where its parameter is (a copy when
        it was offloaded); ``None`` without one."""
        entry = self.masters.get(id(param))
        if entry is not None:
            return entry[1]
        parked = self.parked.get(id(param))
        return None if parked is None else parked.restore()

    # ---- around the optimizer ----
    def _post_step_hooks(self) -> OrderedDict[int, Any]:
        """The optimizer's own post-step hooks, in the order they run (torch keeps an ``OrderedDict``)."""
        return cast('OrderedDict[int, Any]', self.optimizer._optimizer_step_post_hooks)

    def install(self) -> None:
        """Hook the optimizer's ``step`` and ``load_state_dict``. Idempotent."""
        if self._handles:
            return
        after_step = self.optimizer.register_step_post_hook(self._after_step)
        # First after the step: other post-step hooks (RowFreezer's restore of frozen rows) then see the cast weights;
        # last, what they changed in the weights goes back into the masters.
        self._post_step_hooks().move_to_end(after_step.id, last=False)
        self._after_others = self.optimizer.register_step_post_hook(self._take_back_changes)
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before_step),
            after_step,
            self._after_others,
            self.optimizer.register_load_state_dict_pre_hook(self._before_load),
            self.optimizer.register_load_state_dict_post_hook(self._after_load),
        ]

    def remove(self) -> None:
        """Remove the hooks and the masters (weights keep their last cast)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.masters.clear()
        self.parked.clear()
        self._names.clear()
        self._versions.clear()

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> Optional[tuple[Any, Any]]:
        """Swap the masters in; when the step gets a closure (Composer's Trainer runs forward and backward in it),
        only after the closure has run."""
        self.sync()
        closure = kwargs.get('closure', args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            self._swap_in()
            return None

        def closure_then_swap() -> Any:
            self._swap_out()  # an optimizer that calls the closure again (L-BFGS) evaluates the cast weights
            with torch.enable_grad():
                loss = closure()
            self._swap_in()
            return loss

        if 'closure' in kwargs:
            return args, {**kwargs, 'closure': closure_then_swap}
        return (args[0], closure_then_swap, *args[2:]), kwargs

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._swap_out()

    @torch.no_grad()
    def _swap_in(self) -> None:
        """Each mastered parameter with a gradient: its master takes its place in the param group and its optimizer
        state, with the gradient in fp32 (the low-precision one is released: the peak holds one copy of each)."""
        optimizer = self.optimizer
        for group in optimizer.param_groups:
            params = group['params']
            for index, param in enumerate(params):
                entry = self.masters.get(id(param))
                if entry is None or param.grad is None:
                    continue  # the optimizer skips a parameter without a gradient
                master = entry[1]
                master.grad = param.grad.to(self.dtype)
                param.grad = None
                params[index] = master
                state = optimizer.state.pop(param, None)
                if state is not None:
                    optimizer.state[master] = self._fp32_state(state)
                self._swapped.append((group, index, param, master))

    @torch.no_grad()
    def _swap_out(self) -> None:
        """Cast each stepped master back into its low-precision weight; the parameter takes its place back."""
        swapped, self._swapped = self._swapped, []
        optimizer = self.optimizer
        self._stepped = [param for _, _, param, _ in swapped]
        for group, index, param, master in swapped:
            group['params'][index] = param
            state = optimizer.state.pop(master, None)
            if state is not None:
                optimizer.state[param] = state
            master.grad = None
            local_tensor(param.detach()).copy_(local_tensor(master))
            self._versions[id(param)] = self._version_of(param)

    @torch.no_grad()
    def _take_back_changes(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """After every other post-step hook: a weight element one of them restored (RowFreezer's frozen rows) is
        restored in its master too, so masters equal their weights, cast, between steps."""
        stepped, self._stepped = self._stepped, []
        for param in stepped:
            master = self.master_of(param)
            if master is not None:
                self._take_back(param, master)

    def _fp32_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """State loaded or made while the parameter had no master becomes fp32 (the step needs one dtype)."""
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION_DTYPES and key != 'step':
                state[key] = value.to(self.dtype)
        return state

    def _before_load(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        self._loading = state_dict

    def _after_load(self, optimizer: Optimizer) -> None:
        """``Optimizer.load_state_dict`` casts state to its parameter's dtype: give low-precision parameters their
        saved fp32 state back (it was made while the master stood in for the weight)."""
        saved, self._loading = self._loading, None
        if saved is None:
            return
        saved_params = chain.from_iterable(group['params'] for group in saved['param_groups'])
        params = chain.from_iterable(group['params'] for group in optimizer.param_groups)
        by_saved_id = dict(zip(saved_params, params))
        for saved_id, saved_state in saved['state'].items():
            param = by_saved_id.get(saved_id)
            if param is None or param.dtype not in LOW_PRECISION_DTYPES or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            for key, value in saved_state.items():
                loaded = state.get(key)
                if key == 'step' or not isinstance(value, torch.Tensor) or not isinstance(loaded, torch.Tensor):
                    continue
                if value.dtype == self.dtype and loaded.dtype != self.dtype:
                    state[key] = value.to(device=loaded.device, copy=True)

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: master}`` (names in the user's model), parked masters included. A sharded master is
        gathered whole, onto the CPU (a collective: under FSDP2 every rank calls it, as Composer's checkpointing
        does)."""
        saved = {
            self._names[key]: full_tensor(master).cpu() if is_sharded(master) else master
            for key, (_, master) in self.masters.items()
            if self._names[key]
        }
        if self.parked and torch.cuda.is_available():
            torch.cuda.synchronize()  # parked masters were copied to the host without blocking
        saved.update((self._names[key], parked.whole()) for key, parked in self.parked.items() if self._names[key])
        return saved

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the masters a checkpoint saved (after the model's weights are loaded, before the optimizer's state):
        those of parameters that require grad now train, the others are parked.

        Raises:
            ValueError: if a name is not a parameter of the model.
        """
        params = dict(user_module(self.model).named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(
                f'The checkpoint has fp32 master weights for {unknown[:5]}, which are not parameters of this model; '
                'resume with the model and algorithms it was trained with.',
            )
        self.masters.clear()
        self.parked.clear()
        self._names.clear()
        self._versions.clear()  # the next sync compares each weight with its loaded master once
        for name, saved in state.items():
            param = params[name]
            # Saved whole; under FSDP2 each rank keeps its own rows, laid out as the parameter is.
            local = local_part(saved, param).to(dtype=self.dtype, copy=True)
            layout = ShardLayout.of(param) if is_sharded(param) else None
            if not param.requires_grad and self.park_device is not None:  # parked: no trip through the device
                offloaded = OffloadedTensor(local.to(self.park_device), param.device, layout)
                self.parked[id(param)] = ParkedMaster(param, offloaded, offloaded=True)
            else:
                local = local.to(param.device)
                master = local if layout is None else layout.wrap(local)
                if param.requires_grad:
                    self.masters[id(param)] = (param, master)
                else:
                    self.parked[id(param)] = ParkedMaster(param, master, offloaded=False)
            self._names[id(param)] = name


def master_weights_of(optimizer: Optional[Optimizer]) -> Optional[MasterWeights]:
    """The :class:`MasterWeights` attached to ``optimizer``, if any."""
    return None if optimizer is None else _ATTACHED.get(optimizer)


def attach_master_weights(optimizer: Optimizer, model: nn.Module, mode: MasterWeightsMode = 'fp32') -> MasterWeights:
    """The optimizer's :class:`MasterWeights`, created and installed on first use."""
    check_master_weights(mode)
    existing = _ATTACHED.get(optimizer)
    if existing is not None:
        return existing
    masters = MasterWeights(optimizer, model, _MASTER_DTYPES[mode])
    masters.install()
    _ATTACHED[optimizer] = masters
    return masters


def release_masters(optimizer: Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Drop the masters of ``params`` if ``optimizer`` has master weights (a no-op otherwise)."""
    masters = _ATTACHED.get(optimizer)
    if masters is not None:
        masters.release(params)


def enable_master_weights(
    model: nn.Module,
    optimizers: Optional[Optimizers],
    mode: Optional[MasterWeightsMode],
    park_device: Optional[Union[str, torch.device]] = None,
) -> Optional[MasterWeights]:
    """Give the parameters ``optimizers`` trains fp32 masters (``mode='fp32'``); ``None`` does nothing.

    ``park_device`` is where the masters of parameters that stop training for a while are kept (HiFT's offload
    device); ``None`` keeps them where they are (or as an earlier call set it).

    Call it once what trains is decided (algorithms do at ``Event.BEFORE_LOAD``); later changes are followed at each
    step, and :func:`~composer_thaw.utils.optimizer_surgery.remove_params` drops the masters of what it removes.

    Raises:
        ConfigError: for an unknown ``mode``.
        ValueError: without an optimizer.
    """
    check_master_weights(mode)
    if mode is None:
        return None
    optimizer = single_optimizer(optimizers)
    if optimizer is None:
        raise ValueError(f'master_weights={mode!r} needs the optimizer that trains the model; got none.')
    masters = attach_master_weights(optimizer, model, mode)
    if park_device is not None:
        masters.park_device = torch.device(park_device)
    masters.sync()
    return masters


class MasterWeightsOption:
    """An algorithm's ``master_weights`` option: enables the masters, saves and loads them with the algorithm.

    Example:
        >>> model = nn.Linear(2, 2).to(torch.bfloat16)
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> option = MasterWeightsOption('fp32')  # in the algorithm's __init__ (master_weights='fp32')
        >>> option.enable(model, optimizer)  # once what trains is decided
        >>> saved = option.state_dict()  # in its state_dict
        >>> {name: master.dtype for name, master in saved['master_weights'].items()}
        {'weight': torch.float32, 'bias': torch.float32}
        >>> option.load_state_dict(saved)  # in its load_state_dict
    """

    KEY = 'master_weights'

    def __init__(self, mode: Optional[MasterWeightsMode]):
        check_master_weights(mode)
        self.mode = mode
        self.masters: Optional[MasterWeights] = None
        self._pending: Optional[dict[str, torch.Tensor]] = None

    def enable(
        self, model: nn.Module, optimizers: Optional[Optimizers], park_device: Optional[Union[str, torch.device]] = None
    ) -> None:
        """Attach the masters; ``park_device`` is where the masters of parameters that stop training for a while are
        kept (HiFT's offload device; ``None``: where they are)."""
        self.masters = enable_master_weights(model, optimizers, self.mode, park_device)
        if self.masters is not None and self._pending is not None:
            self.masters.load_state_dict(self._pending)
            self._pending = None

    def sync(self) -> None:
        """Follow a change of what trains now (e.g. HiFT's group switch), not only at the next step."""
        if self.masters is not None:
            self.masters.sync()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.masters is None else {self.KEY: self.masters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get(self.KEY)
        if saved is None or self.mode is None:
            return
        if self.masters is None:
            self._pending = saved  # taken when enabled
        else:
            self.masters.load_state_dict(saved)
