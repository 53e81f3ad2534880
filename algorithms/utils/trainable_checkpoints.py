"""Checkpoints that hold only what training changes: the trainable tensors, with a fingerprint of the frozen ones.

An algorithm that freezes weights from the start (``LoRAInject``'s base model, ``RegexFreeze``'s frozen tensors)
leaves them exactly as the model was built, so a checkpoint need not store them: resuming builds the same model
(the user's code or ``from_pretrained`` path) and loads the trainable tensors, their optimizer state and the
algorithm state on top, as Composer's ``HuggingFaceModel(should_save_peft_only=True)`` does for PEFT models.

:func:`checkpoint_trainable_only` installs this on the module that checkpoints save (Composer's model) through
torch's own state-dict hooks, so Composer's ``State.state_dict()`` / ``load_state_dict`` (and anything else that
calls ``state_dict()``) see it without any change to checkpoint files:

- saving drops every parameter the algorithm keeps frozen from the start (and that does not require grad) from the
  state dict and adds, under :data:`FINGERPRINT_KEY`, a fingerprint of each (dtype, shape and a BLAKE2b digest of
  its bytes); buffers are kept. Hugging Face exports (``save_pretrained``, llm-foundry's ``hf_checkpointer``) read
  the inner Hugging Face model and still get every weight.
- loading (a resume or ``load_weights_only``) compares each fingerprinted tensor of the model as built now with the
  fingerprint, before any weight is copied and before any training step, and refuses, naming the tensor, when one
  differs: the checkpoint's trainable tensors were trained on other frozen weights. The frozen tensors a strict
  load finds missing are the fingerprinted ones; any other missing key still fails.
- when a checkpoint that holds frozen tensors is loaded (a full checkpoint, e.g. ``load_weights_only`` from a
  pre-training run), the frozen weights no longer are the model's as built, so from then on this run's checkpoints
  hold them again (with a warning once).

Sharded (FSDP2) models are refused: a fingerprint of a sharded tensor would need the whole tensor gathered on
every rank at each save; the algorithms write full checkpoints there (see their ``checkpoint_trainable_only``).

Example:
    >>> def build(seed):  # the run's model: a frozen base layer, a trainable head
    ...     torch.manual_seed(seed)
    ...     model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).requires_grad_(False)
    ...     model[1].requires_grad_(True)
    ...     checkpoint_trainable_only(model, owner='MyFreeze')
    ...     return model
    >>> state = build(0).state_dict()
    >>> sorted(state)  # the head and FINGERPRINT_KEY; no frozen base weights
    ['1.bias', '1.weight', 'thaw_frozen_fingerprint']
    >>> build(0).load_state_dict(state)  # a model built the same way: checked, then loaded
    <All keys matched successfully>
    >>> build(1).load_state_dict(state)  # other frozen weights
    Traceback (most recent call last):
    FrozenWeightsMismatch: ...
"""

from __future__ import annotations

import functools
import hashlib
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

from composer_thaw.core.resume_checks import RESUME_CONFIG_KEY, check_resume_config, resume_config
from composer_thaw.utils.sharding import is_sharded

log = logging.getLogger(__name__)

__all__ = [
    'FINGERPRINT_KEY',
    'FrozenWeightsMismatch',
    'TrainableOnlyCheckpoints',
    'checkpoint_trainable_only',
    'frozen_fingerprints',
    'install_for_trainer',
    'tensor_fingerprint',
    'trainable_only_handler',
]

# A top-level key (no dot): torch.distributed.checkpoint's state-dict helpers map it to itself.
FINGERPRINT_KEY = 'thaw_frozen_fingerprint'
_FORMAT_VERSION = 1


class FrozenWeightsMismatch(ValueError):
    """A trainable-only checkpoint was written on frozen weights other than the model's as built now."""


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """``'<dtype>[<shape>]:<BLAKE2b digest of the bytes>'`` of a (non-sharded) tensor.

    Example:
        >>> tensor_fingerprint(torch.zeros(2, 3))
        'float32[2, 3]:...'
    """
    raw = tensor.detach().to('cpu').contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.blake2b(raw.numpy().data, digest_size=16).hexdigest()
    dtype = str(tensor.dtype).removeprefix('torch.')
    return f'{dtype}{list(tensor.shape)}:{digest}'


def frozen_fingerprints(module: nn.Module) -> dict[str, str]:
    """The fingerprint of each parameter of ``module`` that does not require grad, by state-dict name (tied
    parameters under each of their names)."""
    return {name: tensor_fingerprint(p) for name, p in _frozen_parameters(module).items()}


def _frozen_parameters(module: nn.Module, kept_frozen: Optional[set[int]] = None) -> dict[str, torch.Tensor]:
    """Parameters not requiring grad by state-dict name; with ``kept_frozen`` (ids) only those among them."""
    return {
        name: p
        for name, p in module.named_parameters(remove_duplicate=False)
        if not p.requires_grad and (kept_frozen is None or id(p) in kept_frozen)
    }


FrozenSource = Callable[[], Iterable[torch.Tensor]]


class TrainableOnlyCheckpoints:
    """The state-dict hooks :func:`checkpoint_trainable_only` installs on one module (see the module docstring).

    Attributes:
        owner: the algorithm that asked for it (named in messages).
        save_trainable_only: whether ``state_dict()`` leaves out the frozen parameters; loading always checks a
            fingerprint it finds.
        frozen_loaded: whether frozen weights were loaded from a checkpoint (then saves are full again).
    """

    def __init__(self, owner: str, save_trainable_only: bool = True, frozen: Optional[FrozenSource] = None):
        self.owner = owner
        # the algorithms whose configuration shapes which tensors are frozen (their resume_fields are recorded)
        self.algorithms: list[Any] = []
        self.save_trainable_only = save_trainable_only
        # what the algorithms keep frozen from the start; None: every parameter without requires_grad
        self.frozen_sources: Optional[list[FrozenSource]] = None if frozen is None else [frozen]
        self.frozen_loaded = False
        self._digests: dict[tuple[int, int, torch.dtype, tuple[int, ...]], str] = {}  # cache; see _fingerprint
        self._expected_missing: set[str] = set()

    def frozen_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters of ``module`` that checkpoints leave out, by state-dict name: those the algorithms keep
        frozen from the start (not ones another algorithm froze after training them, as HiFT's rotation does),
        and only while they do not require grad."""
        if self.frozen_sources is None:
            return _frozen_parameters(module)
        return _frozen_parameters(module, {id(p) for source in self.frozen_sources for p in source()})

    def _fingerprint(self, tensor: torch.Tensor) -> str:
        # Frozen tensors do not change between saves; an in-place change bumps the tensor's version counter.
        key = (tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape))
        if key not in self._digests:
            self._digests[key] = tensor_fingerprint(tensor)
        return self._digests[key]

    def _refuse_sharded(self, frozen: dict[str, torch.Tensor]) -> None:
        sharded = next((name for name, p in frozen.items() if is_sharded(p)), None)
        if sharded is not None:
            raise NotImplementedError(
                f'{self.owner}: trainable-only checkpoints do not support sharded (FSDP2) models (e.g. {sharded!r} '
                f'is a DTensor); set checkpoint_trainable_only=False (the default under FSDP2) to write full ones.',
            )

    # ---- state-dict post-hook: saving ----
    def drop_frozen(self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not self.save_trainable_only or self.frozen_loaded:
            return
        frozen = self.frozen_parameters(module)
        self._refuse_sharded(frozen)
        fingerprints = {}
        for name, param in frozen.items():
            if state.pop(f'{prefix}{name}', None) is not None:
                fingerprints[name] = self._fingerprint(param)
        configs = {type(algorithm).__name__: resume_config(algorithm) for algorithm in self.algorithms}
        state[f'{prefix}{FINGERPRINT_KEY}'] = {
            'version': _FORMAT_VERSION,
            'owner': self.owner,
            'frozen': fingerprints,
            'configs': configs,
        }

    # ---- load pre-hook: check before anything is copied ----
    def check_frozen(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        record = state.pop(f'{prefix}{FINGERPRINT_KEY}', None)
        if record is None and prefix:  # under DDP torch's loader keeps the checkpoint's key as written: unprefixed
            record = state.pop(FINGERPRINT_KEY, None)
        self._expected_missing = set()
        if record is None:
            if any(f'{prefix}{name}' in state for name in self.frozen_parameters(module)):
                self._note_frozen_loaded()
            return
        expected: dict[str, str] = record.get('frozen', {})
        # Which tensors are frozen follows from the algorithms' configuration: a changed one (LoRA's targets) is
        # named as such, before the fingerprints would only say that a tensor is missing.
        for algorithm in self.algorithms:
            saved = record.get('configs', {}).get(type(algorithm).__name__)
            if saved is not None:
                check_resume_config(algorithm, {RESUME_CONFIG_KEY: saved})
        params = dict(module.named_parameters(remove_duplicate=False))
        self._refuse_sharded({name: params[name] for name in expected if name in params})
        for name, fingerprint in expected.items():
            if f'{prefix}{name}' in state:
                continue  # the state brings the tensor itself
            if name not in params:
                raise FrozenWeightsMismatch(
                    f'{self.owner}: the checkpoint was trained on a frozen tensor {name!r} that this model does not '
                    f'have; build the model the checkpoint was trained on (same architecture and algorithms).',
                )
            actual = self._fingerprint(params[name])
            if actual != fingerprint:
                raise FrozenWeightsMismatch(
                    f'{self.owner}: the frozen tensor {name!r} of this model differs from the one the checkpoint was '
                    f'trained on (checkpoint {fingerprint}, model {actual}). The checkpoint holds only trainable '
                    'tensors and expects the frozen ones as the model is built; build the model from the same '
                    'weights (same checkpoint folder or seed) or load a full checkpoint.',
                )
            self._expected_missing.add(f'{prefix}{name}')

    def _note_frozen_loaded(self) -> None:
        if self.save_trainable_only and not self.frozen_loaded:
            warnings.warn(
                f'{self.owner}: frozen weights were loaded from a checkpoint, so they are no longer the model as '
                'built; checkpoints of this run hold them too (full checkpoints).',
                UserWarning,
                stacklevel=2,
            )
        self.frozen_loaded = True

    # ---- load post-hook: the fingerprinted tensors are not missing ----
    def forgive_missing(self, module: nn.Module, incompatible_keys: Any) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if key not in self._expected_missing]


def trainable_only_handler(module: nn.Module) -> Optional[TrainableOnlyCheckpoints]:
    """The handler installed on ``module`` by :func:`checkpoint_trainable_only`, or ``None``."""
    handler = getattr(module, FINGERPRINT_KEY, None)
    return handler if isinstance(handler, TrainableOnlyCheckpoints) else None


def checkpoint_trainable_only(
    module: nn.Module, owner: str, save: bool = True, frozen: Optional[FrozenSource] = None
) -> TrainableOnlyCheckpoints:
    """Make the checkpoints of ``module`` hold only its trainable tensors and a fingerprint of its frozen ones.

    Call it on the module that checkpoints save (Composer's model: ``state.model`` at ``Event.INIT``, before DDP
    wraps it); calling it again updates ``save`` (``True`` wins, so two algorithms asking for it agree).

    Args:
        module: the module whose ``state_dict()`` checkpoints hold.
        owner: the algorithm asking (named in messages).
        save: whether saves leave frozen parameters out; with ``False`` only the load-time check is installed, so
            that a trainable-only checkpoint loaded into a run writing full ones is still checked.
        frozen: returns the parameters ``owner`` keeps frozen from the start (called at each save); ``None``: every
            parameter that does not require grad. Algorithms pass theirs, so that parameters another algorithm
            freezes for a while after training them (HiFT's rotation over LoRA adapters) stay in checkpoints.

    Returns:
        The :class:`TrainableOnlyCheckpoints` handler (also stored on ``module`` under :data:`FINGERPRINT_KEY`).
    """
    handler = trainable_only_handler(module)
    if handler is not None:
        handler.save_trainable_only = handler.save_trainable_only or save
        if handler.frozen_sources is not None:
            handler.frozen_sources = None if frozen is None else [*handler.frozen_sources, frozen]
        return handler
    handler = TrainableOnlyCheckpoints(owner, save, frozen)
    # The attribute also lets torch.distributed.checkpoint resolve the key under a DDP wrapper ('module.<key>').
    setattr(module, FINGERPRINT_KEY, handler)
    # a partial, not a bound method: torch marks public-API hooks with an attribute
    module.register_state_dict_post_hook(functools.partial(TrainableOnlyCheckpoints.drop_frozen, handler))
    module.register_load_state_dict_pre_hook(handler.check_frozen)
    module.register_load_state_dict_post_hook(handler.forgive_missing)
    log.info(
        '%s: checkpoints of %s %s.',
        owner,
        type(module).__name__,
        'hold trainable tensors only' if save else 'are full; trainable-only ones are checked on load',
    )
    return handler


def install_for_trainer(
    state: Any, algorithm: Any, requested: Optional[bool], default: bool, frozen: FrozenSource
) -> TrainableOnlyCheckpoints:
    """What an algorithm calls at ``Event.INIT``: trainable-only saves on ``state.model`` when ``requested`` (``None``:
    ``default``, and off under FSDP), and the load-time fingerprint check in any case. ``frozen`` returns the
    parameters the algorithm keeps frozen from the start. The checkpoint records the algorithm's configuration
    (its ``resume_fields``), so that loading with another one is refused by field, before the fingerprints.

    Raises:
        NotImplementedError: ``requested=True`` on a sharded (FSDP) Trainer, before anything changes.
    """
    owner = type(algorithm).__name__
    sharded = getattr(state, 'fsdp_config', None) is not None
    if requested and sharded:
        raise NotImplementedError(
            f'{owner}(checkpoint_trainable_only=True) does not support sharded (FSDP2) training yet: fingerprinting '
            'sharded frozen weights would gather each of them on every rank. Leave checkpoint_trainable_only unset '
            '(full checkpoints under FSDP2) or train without FSDP.',
        )
    save = (default if requested is None else requested) and not sharded
    handler = checkpoint_trainable_only(state.model, owner, save, frozen)
    handler.algorithms.append(algorithm)
    return handler
