"""Check plain-data configuration (from YAML) against Python type annotations, with errors users can act on.

Example:
    >>> check_value('optimizer.lr', 'fast', float)
    Traceback (most recent call last):
    ConfigTypeError: optimizer.lr = 'fast': expected a number (float).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

__all__ = [
    'ConfigError',
    'ConfigTypeError',
    'check_call_kwargs',
    'check_value',
    'closest_names',
    'describe_type',
    'from_mapping',
]


class ConfigError(ValueError):
    """A configuration value is invalid. ``str()`` is one paragraph naming the key, the value and what is valid."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f'{key} = {value!r}: {problem}')

    def __reduce__(self) -> tuple[Any, ...]:  # pickle (errors cross process boundaries) with all three arguments
        return type(self), (self.key, self.value, self.problem)

    def under(self, prefix: str) -> ConfigError:
        """The same error (same class) with its key placed under ``prefix``.

        Example:
            >>> str(ConfigError('r', '8', 'expected an integer.').under('algorithms.lora_inject'))
            "algorithms.lora_inject.r = '8': expected an integer."
        """
        return type(self)(f'{prefix}.{self.key}' if self.key else prefix, self.value, self.problem)


class ConfigTypeError(ConfigError, TypeError):
    """An unknown or missing key, or a value of the wrong type: where a Python call raises ``TypeError``.

    Both a :class:`ConfigError` (so a ``ValueError``) and a ``TypeError``, so code that catches the ``TypeError`` of
    ``cls(**kwargs)`` with a misspelled keyword (``unexpected keyword argument``) still catches it.
    """


def describe_type(annotation: Any) -> str:
    """A short human description of an annotation: ``'a number (float)'``, ``"one of 'a', 'b'"``."""
    origin = get_origin(annotation)
    if annotation is Any:
        return 'any value'
    if annotation is type(None):
        return 'null'
    if annotation is bool:
        return 'true or false'
    if annotation is int:
        return 'an integer'
    if annotation is float:
        return 'a number (float)'
    if annotation is str:
        return 'a string'
    if origin is Literal:
        return 'one of ' + ', '.join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return ' or '.join(describe_type(a) for a in get_args(annotation))
    if origin in (list, tuple, typing.Sequence, _abc_sequence()):
        args = get_args(annotation)
        return f'a list of {describe_type(args[0])}' if args else 'a list'
    if origin in (dict, typing.Mapping, _abc_mapping()):
        args = get_args(annotation)
        return f'a mapping of {describe_type(args[0])} to {describe_type(args[1])}' if args else 'a mapping'
    if dataclasses.is_dataclass(annotation):
        return f'a mapping with keys {", ".join(f.name for f in dataclasses.fields(annotation))}'
    return getattr(annotation, '__name__', str(annotation))


def _abc_sequence():
    import collections.abc

    return collections.abc.Sequence


def _abc_mapping():
    import collections.abc

    return collections.abc.Mapping


def _matches(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(annotation))
    if origin in (list, tuple, typing.Sequence, _abc_sequence()):
        item_args = [a for a in get_args(annotation) if a is not Ellipsis]
        # sets too: Python callers pass {'q_proj', 'v_proj'} where a list of names is meant (PEFT accepts them)
        collection = isinstance(value, (list, tuple, set, frozenset))
        return collection and (not item_args or all(_matches(v, item_args[0]) for v in value))
    if origin in (dict, typing.Mapping, _abc_mapping()):
        args = get_args(annotation)
        return isinstance(value, Mapping) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    if dataclasses.is_dataclass(annotation):  # a mapping of its fields (a recipe's), or one built in Python
        return isinstance(value, Mapping) or (isinstance(annotation, type) and isinstance(value, annotation))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # annotations we cannot check (callables, protocols) are left to the consumer


def check_value(key: str, value: Any, annotation: Any) -> None:
    """Raise :class:`ConfigTypeError` unless ``value`` fits ``annotation``."""
    if not _matches(value, annotation):
        raise ConfigTypeError(key, value, f'expected {describe_type(annotation)}.')


def _nested_dataclass(annotation: Any) -> Any:
    """The dataclass ``annotation`` is, or that ``Optional[...]`` of it holds; ``None`` otherwise."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        classes = [arg for arg in get_args(annotation) if dataclasses.is_dataclass(arg)]
        if len(classes) == 1 and type(None) in get_args(annotation):
            return classes[0]
    return None


def from_mapping(cls: type, data: Any, key: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking unknown keys, missing keys and types (recursively)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigTypeError(key, data, f'expected {describe_type(cls)}.')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        bad = unknown[0]
        suggestion = closest_names(str(bad), list(fields), n=1)
        raise ConfigTypeError(
            f'{key}.{bad}' if key else str(bad),
            data[bad],
            f'unknown key {bad!r}'
            + (f' (did you mean {suggestion[0]!r}?)' if suggestion else '')
            + f'; valid keys{" under " + key if key else ""}: {", ".join(fields)}.',
        )
    values = {}
    for name, field in fields.items():
        path = f'{key}.{name}' if key else name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigTypeError(path, None, f'missing required key; expected {describe_type(hints[name])}.')
            continue
        annotation = hints[name]
        nested = _nested_dataclass(annotation)
        if nested is not None and (data[name] is not None or nested is annotation):
            values[name] = from_mapping(nested, data[name], path)
        else:
            check_value(path, data[name], annotation)
            values[name] = data[name]
    return cls(**values)


def closest_names(query: str, names: Iterable[str], n: int = 5, *, loose: bool = True) -> list[str]:
    """The package's one "did you mean" helper: up to ``n`` of ``names`` most like ``query``, closest first.

    With ``loose=False`` (a misspelled option name) only look-alikes: the close ones (similarity 0.6, difflib's
    default) if there are any, else the loosely similar ones (0.4), else none. With ``loose=True`` (a pattern that
    matched nothing) the loosely similar ones, then names that contain the query stripped of regex syntax, and if
    nothing resembles it, the first ``n`` names, so the message always shows some valid ones.

    Example:
        >>> closest_names('lora_alhpa', ['r', 'lora_alpha', 'lora_dropout'], n=3, loose=False)
        ['lora_alpha']
        >>> closest_names('rank', ['r', 'lora_alpha', 'rank_pattern'], n=3, loose=False)
        ['rank_pattern', 'r']
        >>> closest_names('layers.9', ['model.layers.0', 'model.norm', 'lm_head'], n=2)
        ['model.layers.0']
    """
    names = list(names)
    if not loose:
        return difflib.get_close_matches(query, names, n=n) or difflib.get_close_matches(query, names, n=n, cutoff=0.4)
    close = difflib.get_close_matches(query, names, n=n, cutoff=0.4)
    if len(close) < n:
        stripped = query.strip('^$.*\\[]()')
        close += [name for name in names if stripped and stripped in name and name not in close][: n - len(close)]
    return close or names[:n]


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    suggestions = closest_names(name, choices, n=3, loose=False)
    return f' (did you mean {" or ".join(map(repr, suggestions))}?)' if suggestions else ''


def check_call_kwargs(where: str, cls: type[Any], kwargs: Mapping[str, Any]) -> None:
    """Check ``kwargs`` against ``cls.__init__``: unknown names, missing required ones, and annotated types.

    Raises :class:`ConfigTypeError` (a ``ValueError`` and a ``TypeError``) with keys under ``where``; a misspelled
    name gets the closest valid ones and the full list. A constructor with ``**kwargs`` accepts any name.

    Example:
        >>> from composer_thaw import LoRAInject
        >>> check_call_kwargs('algorithms.lora_inject', LoRAInject, {'lora_alhpa': 16})
        Traceback (most recent call last):
        ConfigTypeError: algorithms.lora_inject.lora_alhpa = 16: LoRAInject has no option 'lora_alhpa' (did you mean
        'lora_alpha'?); valid options: config, r, lora_alpha, ...
    """
    signature = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    parameters = {
        name: parameter
        for name, parameter in signature.parameters.items()
        if name != 'self' and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: leave type checks to the class itself
        hints = {}
    for key, value in kwargs.items():
        if key not in parameters:
            if takes_any:
                continue
            raise ConfigTypeError(
                f'{where}.{key}' if where else key,
                value,
                f'{cls.__name__} has no option {key!r}{_did_you_mean(key, list(parameters))}; valid options: '
                f'{", ".join(parameters) or "(none)"}.',
            )
        if key in hints:
            check_value(f'{where}.{key}' if where else key, value, hints[key])
    missing = [key for key, p in parameters.items() if p.default is p.empty and key not in kwargs]
    if missing:
        raise ConfigTypeError(
            where,
            dict(kwargs),
            f'{cls.__name__} needs {", ".join(f"{k} ({describe_type(hints.get(k, Any))})" for k in missing)}.',
        )
