"""What every algorithm of this package shares: constructor arguments checked by name and type, a ``repr`` that
evals back, versioned checkpoint state.

Example:
    >>> class MyFreeze(ConfigRepr):  # an Algorithm subclass too, in practice
    ...     def __init__(self, patterns: list[str], lr_scale: float = 1.0):
    ...         self.patterns, self.lr_scale = patterns, lr_scale
    >>> repr(MyFreeze(['lm_head']))
    "MyFreeze(patterns=['lm_head'])"
    >>> MyFreeze(['lm_head'], lr_scael=0.1)
    Traceback (most recent call last):
    ConfigTypeError: MyFreeze.lr_scael = 0.1: MyFreeze has no option 'lr_scael' (did you mean 'lr_scale'?); valid
    options: patterns, lr_scale.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

import composer_thaw
from composer_thaw.core.options import config_options_of
from composer_thaw.core.registry import algorithm_registry, registered_name
from composer_thaw.core.validation import ConfigError, check_call_kwargs

__all__ = [
    'STATE_VERSION_KEY',
    'ConfigRepr',
    'check_state_version',
    'checked_init',
    'config_key',
    'eval_repr',
    'init_arguments',
    'refuse_duplicates',
]

STATE_VERSION_KEY = 'thaw_state_version'


def init_arguments(obj: Any) -> dict[str, Any]:
    """The constructor arguments of ``obj`` that differ from their defaults, read from same-named attributes; a
    configuration object given as one argument appears as its fields (:mod:`~composer_thaw.core.options`)."""
    options = config_options_of(type(obj))
    arguments = {}
    for name, parameter in inspect.signature(type(obj).__init__).parameters.items():
        if name == 'self' or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if options is not None and name == options.parameter:
            continue
        value = getattr(obj, name)
        if parameter.default is parameter.empty or value != parameter.default:
            arguments[name] = value
    return arguments


def config_key(cls: type) -> str:
    """Where ``cls``'s options sit in a recipe: ``'algorithms.<registered name>'``, or the class name if unregistered.

    Example:
        >>> from composer_thaw import LoRAInject
        >>> config_key(LoRAInject)
        'algorithms.lora_inject'
        >>> config_key(ConfigRepr)
        'ConfigRepr'
    """
    name = registered_name(cls)
    return f'algorithms.{name}' if name is not None else cls.__name__


def checked_init(cls: type, init: Callable[..., None]) -> Callable[..., None]:
    """``cls``'s constructor ``init``, wrapped so that its arguments are checked (names, required ones, annotated
    types) before it runs.

    The errors are those ``thaw run`` gives for a recipe (:func:`~composer_thaw.core.validation.check_call_kwargs`,
    keys under :func:`config_key`), so ``cls(**kwargs)`` from an llm-foundry YAML reads the same. The wrapper keeps
    the signature, annotations and docstring (``functools.wraps``), so ``inspect.signature(cls)`` and
    ``typing.get_type_hints(cls.__init__)`` see the original.

    Example:
        >>> class Scale(ConfigRepr):  # ConfigRepr wraps __init__ with checked_init
        ...     def __init__(self, factor: float = 1.0):
        ...         self.factor = factor
        >>> Scale(factor='big')
        Traceback (most recent call last):
        ConfigTypeError: Scale.factor = 'big': expected a number (float).
    """
    positional = [
        p.name
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    options = config_options_of(cls)  # a configuration object, or its fields (composer_thaw.core.options)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        arguments = {**dict(zip(positional, args)), **kwargs}
        try:
            if options is not None and args and positional[:1] == [options.parameter]:  # a value by position
                arguments = options.positional_field_value(arguments, cls.__name__)
            check_call_kwargs('', cls, arguments)
            if options is not None:
                options.check_call(arguments)
        except ConfigError as error:
            raise error.under(config_key(cls)) from None
        init(self, **arguments)

    return checked


class ConfigRepr:
    """Mixin: constructor arguments are checked by name and type (:func:`checked_init`, applied to each subclass's
    ``__init__``); ``repr`` is the constructor call (keyword arguments that differ from defaults), so
    ``eval(repr(algorithm))`` rebuilds an equal algorithm, and ``==`` compares configurations.

    The constructor must store each argument under an attribute of the same name. One that takes a configuration
    object or its fields (:class:`~composer_thaw.core.options.ConfigOptions`) stores the object, whose fields read
    through as attributes (``algorithm.r`` is ``algorithm.config.r``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if '__init__' not in cls.__dict__:
            return
        options = config_options_of(cls)
        if options is not None:  # the fields read from the object, read-only: one value, whichever way it was given
            for name in options.names:
                if name not in cls.__dict__:
                    setattr(cls, name, property(operator.attrgetter(f'{options.parameter}.{name}')))
        cls.__init__ = checked_init(cls, cls.__dict__['__init__'])  # type: ignore[method-assign]

    def __repr__(self) -> str:
        arguments = ', '.join(f'{name}={value!r}' for name, value in init_arguments(self).items())
        return f'{type(self).__name__}({arguments})'

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and init_arguments(self) == init_arguments(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def check_state_version(algorithm: str, state: dict[str, Any], supported: int) -> None:
    """Raise a clear error when checkpointed algorithm state has a version this code cannot read.

    State without a version key is accepted as the current version (written before versions existed).
    """
    version = state.get(STATE_VERSION_KEY, supported)
    if version != supported:
        raise ValueError(
            f'{algorithm} checkpoint state has version {version!r}, but this composer-thaw reads version {supported}. '
            'Load the checkpoint with the composer-thaw release that wrote it, or exclude the algorithm with '
            f'`load_exclude_algorithms=[{algorithm!r}]`.',
        )


def eval_repr(text: str) -> Any:
    """Rebuild an algorithm from its ``repr`` (e.g. recorded in a checkpoint).

    The names it can use are this package's public names and the class of each third-party algorithm registered
    under the ``composer_thaw.algorithms`` entry point (only the one the text calls is imported).
    """
    namespace = {name: getattr(composer_thaw, name) for name in composer_thaw.__all__}
    class_name = text.partition('(')[0].strip()
    if class_name not in namespace:
        for entry in algorithm_registry().values():
            if entry.source not in ('composer', 'composer-thaw') and entry.target.rpartition(':')[2] == class_name:
                namespace[class_name] = entry.load()
                break
    return eval(text, {'__builtins__': {}}, namespace)


def refuse_duplicates(algorithm: Any, algorithms: Any, advice: str) -> None:
    """Raise if ``algorithms`` (the Trainer's list) holds more than one algorithm of ``algorithm``'s class.

    Two instances would each decide on their own what trains, the later silently overriding the earlier.
    """
    count = sum(type(other) is type(algorithm) for other in algorithms)
    if count > 1:
        raise ValueError(f'{type(algorithm).__name__} appears {count} times in the algorithms list; {advice}')
