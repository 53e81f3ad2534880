"""Options given as one configuration object or as its fields, as PEFT's ``LoraConfig`` is:
``LoRAInject(LoRAConfig(r=16))`` and ``LoRAInject(r=16)`` (a recipe's ``lora_inject: {r: 16}``) build the same
algorithm.

A constructor takes the configuration dataclass as its first argument and collects the fields in ``**options``;
:meth:`ConfigOptions.accept_fields` lists the fields, read from the dataclass (``dataclasses.fields``), as
keyword-only options of its signature and annotations, so the field list lives in the dataclass alone and what
reads a constructor's signature (the option checks of :func:`~composer_thaw.core.validation.check_call_kwargs`,
``repr`` and ``==`` of :class:`~composer_thaw.core.state.ConfigRepr`, ``help()``) sees every option. A field whose
default is built by a factory (an empty mapping) also takes ``None`` there, for that default.

Example:
    >>> @dataclasses.dataclass
    ... class Shape:
    ...     rank: int = 8
    ...     scales: dict[str, float] = dataclasses.field(default_factory=dict)
    >>> OPTIONS = ConfigOptions(Shape)
    >>> class Adapter:
    ...     @OPTIONS.accept_fields
    ...     def __init__(self, config: Optional[Shape] = None, *, save_to: Optional[str] = None, **options: Any):
    ...         self.config, self.save_to = OPTIONS.build(config, options), save_to
    >>> list(inspect.signature(Adapter).parameters)
    ['config', 'rank', 'scales', 'save_to']
    >>> Adapter(Shape(rank=4)).config == Adapter(rank=4, scales=None).config
    True
    >>> OPTIONS.check_call({'config': Shape(rank=4), 'rank': 16})
    Traceback (most recent call last):
    ConfigTypeError: rank = 16: given both in config and as an option of its own; set it in one place: in the Shape
    (Shape(rank=16, ...)), or pass the options alone, without config.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional, TypeVar

from composer_thaw.core.validation import ConfigTypeError, check_value, from_mapping

__all__ = ['ConfigOptions', 'config_options_of']

Init = TypeVar('Init', bound=Callable[..., None])

_ATTRIBUTE = '__config_options__'  # on a constructor decorated by ConfigOptions.accept_fields
_OPTIONAL: Any = Optional  # subscripted with an annotation read at run time


@dataclasses.dataclass(frozen=True)
class ConfigOptions:
    """A constructor that takes ``config_class`` (a dataclass) as its argument ``parameter``, or its fields as options
    of their own."""

    config_class: type
    parameter: str = 'config'
    # The field that a plain value in the configuration's place stood for before the constructor took a configuration
    # (``LoRAInject(8)`` was ``r=8``): still accepted, with a DeprecationWarning (:meth:`positional_field_value`).
    former_first_field: Optional[str] = None

    @property
    def names(self) -> tuple[str, ...]:
        """The fields of the configuration, in their order."""
        return tuple(field.name for field in dataclasses.fields(self.config_class))

    def _factory_defaults(self) -> dict[str, Any]:
        return {
            field.name: field.default_factory()
            for field in dataclasses.fields(self.config_class)
            if field.default_factory is not dataclasses.MISSING
        }

    def parameters(self) -> list[inspect.Parameter]:
        """The fields as keyword-only parameters, with their annotations (``Optional`` for a factory-made default,
        which ``None`` stands for) and their defaults."""
        hints = typing.get_type_hints(self.config_class)
        made = self._factory_defaults()
        return [
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=made[field.name] if field.name in made else field.default,
                annotation=_OPTIONAL[hints[field.name]] if field.name in made else hints[field.name],
            )
            for field in dataclasses.fields(self.config_class)
        ]

    def accept_fields(self, init: Init) -> Init:
        """Decorate ``init(self, config=None, *, own options..., **options)``: its signature and annotations list the
        configuration's fields as keyword-only options in place of ``**options``."""
        signature = inspect.signature(init)
        spread = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
        if [p.name for p in signature.parameters.values()][1:2] != [self.parameter] or len(spread) != 1:
            raise TypeError(f'{init.__qualname__} must take {self.parameter} first and the fields as **options.')
        given = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        positional = [p for p in given if p.kind is not p.KEYWORD_ONLY]
        fields = self.parameters()
        function: Any = init
        annotations = {k: v for k, v in function.__annotations__.items() if k != spread[0].name}
        function.__signature__ = signature.replace(parameters=[*positional, *fields, *given[len(positional) :]])
        function.__annotations__ = {**annotations, **{p.name: p.annotation for p in fields}}
        setattr(function, _ATTRIBUTE, self)
        return init

    def positional_field_value(self, kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
        """``kwargs`` with a plain value in the configuration's place moved to :attr:`former_first_field` (with a
        ``DeprecationWarning``); unchanged otherwise."""
        config, field = kwargs.get(self.parameter), self.former_first_field
        if field is None or config is None or isinstance(config, (self.config_class, Mapping)):
            return kwargs
        if field in kwargs:
            raise ConfigTypeError(field, kwargs[field], f'given twice: by position ({config!r}) and by name; give one.')
        warnings.warn(
            f'{owner}({config!r}): the {field} by position is deprecated (the first argument is a '
            f'{self.config_class.__name__}); write {owner}({field}={config!r}).',
            DeprecationWarning,
            stacklevel=4,
        )
        return {**{k: v for k, v in kwargs.items() if k != self.parameter}, field: config}

    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`~composer_thaw.core.validation.ConfigTypeError` (keys relative to the call) for a field given
        both in the configuration and as an option of its own, or a configuration given as a mapping whose keys or
        values do not fit its fields."""
        config = kwargs.get(self.parameter)
        if config is None:
            return
        both = [name for name in self.names if name in kwargs]
        if both:
            name, value = both[0], kwargs[both[0]]
            also = f' (also {", ".join(both[1:])})' if both[1:] else ''
            kind = self.config_class.__name__
            raise ConfigTypeError(
                name,
                value,
                f'given both in {self.parameter} and as an option of its own{also}; set it in one place: in the '
                f'{kind} ({kind}({name}={value!r}, ...)), or pass the options alone, without {self.parameter}.',
            )
        if isinstance(config, Mapping):
            from_mapping(self.config_class, config, self.parameter)
        else:
            check_value(self.parameter, config, self.config_class)

    def build(self, config: Any, options: Mapping[str, Any]) -> Any:
        """The configuration: a copy of ``config`` (or built from it, a mapping of its fields), else built from
        ``options`` (the fields; ``None`` for a factory-made default is that default).

        Raises:
            ConfigTypeError: for a field given both ways, or a ``config`` that is no configuration.
        """
        self.check_call({self.parameter: config, **options})
        if config is None:
            made = self._factory_defaults()
            return self.config_class(
                **{name: made[name] if value is None and name in made else value for name, value in options.items()}
            )
        if isinstance(config, Mapping):
            return from_mapping(self.config_class, config, self.parameter)
        return copy.deepcopy(config)


def config_options_of(cls: type) -> Optional[ConfigOptions]:
    """How ``cls``'s constructor takes a configuration object (:meth:`ConfigOptions.accept_fields`), or ``None``."""
    constructor: Any = cls  # its __init__, read from the class
    return getattr(constructor.__init__, _ATTRIBUTE, None)
