"""Resuming needs the configuration that shaped a checkpoint's algorithm state.

Each algorithm names the constructor arguments that shape what it saves (``resume_fields``: HiFT's ``group_size``
and ``strategy``, LoRA's ``r`` and targets, RegexFreeze's patterns, LayerFreezing's granularity and schedule),
records their values with its checkpoint state (:func:`resume_state`) and, when a checkpoint is loaded, refuses a
configuration that differs in any of them (:func:`check_resume_config`), naming the field, the checkpoint's value
and the new one. ``thaw run`` makes the same check before it builds anything
(:func:`~composer_thaw.core.checkpoint_algorithms.check_resume_compatibility`). Starting a new run from a checkpoint's
weights
(``load_weights_only``) reads no algorithm state, so nothing is compared.

Example:
    >>> from composer_thaw.core.state import ConfigRepr
    >>> class MyFreeze(ConfigRepr):  # an Algorithm's state_dict adds resume_state(self) to its own
    ...     resume_fields = ('patterns',)
    ...     def __init__(self, patterns: list[str]):
    ...         self.patterns = patterns
    ...     def state_dict(self):
    ...         return resume_state(self)
    ...     def load_state_dict(self, state):
    ...         check_resume_config(self, state)
    >>> MyFreeze(['lm_head']).load_state_dict(MyFreeze(['embed']).state_dict())
    Traceback (most recent call last):
    ResumeConfigError: MyFreeze.patterns = ['lm_head']: the checkpoint was trained with patterns = ['embed']; ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from composer_thaw.core.options import config_options_of
from composer_thaw.core.state import config_key, eval_repr
from composer_thaw.core.validation import ConfigError

__all__ = ['RESUME_CONFIG_KEY', 'ResumeConfigError', 'check_resume_config', 'resume_config', 'resume_state']

RESUME_CONFIG_KEY = 'resume_config'


class ResumeConfigError(ConfigError):
    """A resume whose configuration differs from the checkpoint's in a field that shaped the saved state.

    The key is the field's (``algorithms.lora_inject.r``), the value the new one; the message names the
    checkpoint's value and the way to start anew from its weights.
    """


def _plain(value: Any) -> Any:
    """``value`` as plain data that compares by content and unpickles anywhere (a function by its qualified name)."""
    if callable(value):
        return f'{getattr(value, "__module__", "?")}.{getattr(value, "__qualname__", type(value).__qualname__)}'
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def resume_config(algorithm: Any) -> dict[str, Any]:
    """The values of ``algorithm``'s ``resume_fields``, as plain data."""
    return {name: _plain(getattr(algorithm, name)) for name in algorithm.resume_fields}


def resume_state(algorithm: Any) -> dict[str, Any]:
    """What ``algorithm.state_dict()`` adds so that a resume can be checked: ``{RESUME_CONFIG_KEY: ...}``."""
    return {RESUME_CONFIG_KEY: resume_config(algorithm)}


def _read_as_now(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the fields of a configuration object (:mod:`~composer_thaw.core.options`) read through it, as
    the algorithm reads them now: a release that recorded them as given (``rank_pattern=None``, a set of names)
    wrote what its configuration object holds (``{}``, a sorted list)."""
    options = config_options_of(cls)
    if options is None:
        return saved
    fields = {name: saved[name] for name in options.names if name in saved}
    try:
        config = options.build(None, fields)
    except (TypeError, ValueError):  # values no release accepted: compared as they are
        return saved
    return {**saved, **{name: _plain(getattr(config, name)) for name in fields}}


def _saved_config(algorithm: Any, state: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The configuration recorded in ``state``; for state saved before it was recorded, the one its ``repr`` gives
    (``None`` if that cannot be rebuilt, e.g. a schedule given as a function)."""
    if RESUME_CONFIG_KEY in state:
        return _read_as_now(type(algorithm), dict(state[RESUME_CONFIG_KEY]))
    text = state.get('repr')
    if not isinstance(text, str) or not text.startswith(f'{type(algorithm).__name__}('):
        return None
    try:
        return resume_config(eval_repr(text))
    except Exception:  # a repr that does not evaluate (a function's): nothing to compare
        return None


def check_resume_config(algorithm: Any, state: Mapping[str, Any], checkpoint: Optional[str] = None) -> None:
    """Raise :class:`ResumeConfigError` if ``state`` (an algorithm's checkpoint state) was saved with other values of
    ``algorithm.resume_fields``; the first differing field is the error's key, the others are listed."""
    saved = _saved_config(algorithm, state)
    if saved is None:
        return
    now = resume_config(algorithm)
    changed = [name for name in algorithm.resume_fields if name in saved and saved[name] != now[name]]
    if not changed:
        return
    first, *others = changed
    also = ''.join(f', {name} = {saved[name]!r} (now {now[name]!r})' for name in others)
    where = 'the checkpoint' if checkpoint is None else f'the checkpoint {checkpoint!r}'
    raise ResumeConfigError(
        f'{config_key(type(algorithm))}.{first}',
        getattr(algorithm, first),
        f'{where} was trained with {first} = {saved[first]!r}{also}; its saved {type(algorithm).__name__} state '
        f'fits only that configuration. Resume with the values it was trained with, or start a new run from its '
        'weights only (recipe key load_weights_only: true, or Trainer(load_weights_only=True)).',
    )
