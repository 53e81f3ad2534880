"""One registry of algorithm names for recipes: ours, Composer's built-ins, and third parties' entry points.

Names are snake_case, as in llm-foundry recipes (``gradient_clipping``, ``ema``, ``lora_inject``). Ours take
precedence; Composer's own ``LayerFreezing`` is ``composer_layer_freezing``. A third-party package adds
algorithms with an entry point in the group ``composer_thaw.algorithms``::

    [options.entry_points]
    composer_thaw.algorithms =
        my_algorithm = my_package.algorithms:MyAlgorithm

Example:
    >>> build_algorithm('gradient_clipping', {'clipping_type': 'norm', 'clipping_threshold': 1.0})
    <composer.algorithms.gradient_clipping.gradient_clipping.GradientClipping object at ...>
    >>> build_algorithm('lora_inject', {'r': 4, 'lora_alhpa': 8})
    Traceback (most recent call last):
    ConfigTypeError: algorithms.lora_inject.lora_alhpa = 8: LoRAInject has no option 'lora_alhpa' (did you mean
    'lora_alpha'?); ...
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Optional

from composer.core import Algorithm

from composer_thaw.core.validation import ConfigError, check_call_kwargs, closest_names

__all__ = [
    'ENTRY_POINT_GROUP',
    'AlgorithmEntry',
    'algorithm_module',
    'algorithm_registry',
    'build_algorithm',
    'our_algorithm_names',
    'registered_name',
]

ENTRY_POINT_GROUP = 'composer_thaw.algorithms'

# name -> "module:Class"; imported only when used.
_OURS = {
    'layer_freezing': 'composer_thaw.layer_freezing:LayerFreezing',
    'regex_freeze': 'composer_thaw.regex_freeze:RegexFreeze',
    'hift_rotation': 'composer_thaw.hift_rotation:HiFTRotation',
    'lora_inject': 'composer_thaw.lora_inject:LoRAInject',
}
_COMPOSER_RENAMES = {'LayerFreezing': 'composer_layer_freezing'}


@dataclass(frozen=True)
class AlgorithmEntry:
    """A registered algorithm: its recipe name, where it comes from, and how to load its class."""

    name: str
    source: str  # 'composer-thaw', 'composer', or the distribution that declared the entry point
    target: str  # "module:Class"

    def load(self) -> type[Algorithm]:
        module_name, _, attribute = self.target.partition(':')
        return getattr(importlib.import_module(module_name), attribute)


@lru_cache(maxsize=1)
def algorithm_registry() -> Mapping[str, AlgorithmEntry]:
    """All known algorithm names."""
    import composer.algorithms as composer_algorithms

    registry: dict[str, AlgorithmEntry] = {}
    for class_name in composer_algorithms.__all__:
        obj = getattr(composer_algorithms, class_name)
        if inspect.isclass(obj) and issubclass(obj, Algorithm):
            name = _COMPOSER_RENAMES.get(
                class_name, obj.__module__.split('.')[2]
            )  # its folder, as llm-foundry names it
            registry[name] = AlgorithmEntry(name, 'composer', f'composer.algorithms:{class_name}')
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        source = entry_point.dist.name if entry_point.dist is not None else 'entry point'
        registry[entry_point.name] = AlgorithmEntry(entry_point.name, source, entry_point.value)
    for name, target in _OURS.items():
        registry[name] = AlgorithmEntry(name, 'composer-thaw', target)
    return registry


def algorithm_module(name: str) -> ModuleType:
    """The module that defines the algorithm registered as ``name``: where it declares what the package finds next
    to its class (``EXAMPLES`` and ``BAD_EXAMPLES`` for the conformance suite, ``estimate_memory`` for ``thaw
    estimate``)."""
    return importlib.import_module(algorithm_registry()[name].load().__module__)


def our_algorithm_names() -> list[str]:
    """Names of this package's algorithms."""
    return [name for name, entry in algorithm_registry().items() if entry.source == 'composer-thaw']


def registered_name(cls: type) -> Optional[str]:
    """The name ``cls`` is registered under, or ``None``; only classes named like ``cls`` are imported.

    Example:
        >>> from composer_thaw import LoRAInject
        >>> registered_name(LoRAInject)
        'lora_inject'
    """
    for name, entry in algorithm_registry().items():
        if entry.target.rpartition(':')[2] == cls.__name__ and entry.load() is cls:
            return name
    return None


def build_algorithm(name: str, kwargs: Mapping[str, Any] | None, where: str = 'algorithms') -> Algorithm:
    """Instantiate the algorithm registered as ``name`` from plain-data ``kwargs``.

    Unknown names, unknown keyword arguments and values of the wrong type raise :class:`ConfigError` naming the
    key, the value and the valid choices (for keyword arguments and types a :class:`ConfigTypeError`, also a
    ``TypeError``); other errors raised by the algorithm's own validation are re-raised as :class:`ConfigError` with
    the key path prefixed. Our algorithms check their keyword arguments the same way when constructed directly
    (``LoRAInject(**kwargs)``, as llm-foundry does), with the same message.
    """
    registry = algorithm_registry()
    if name not in registry:
        suggestions = closest_names(name, sorted(registry), n=3)
        raise ConfigError(
            f'{where}.{name}',
            name,
            f'unknown algorithm. Did you mean {" or ".join(map(repr, suggestions))}? Known algorithms: '
            f'{", ".join(sorted(registry))}.',
        )
    kwargs = dict(kwargs or {})
    cls = registry[name].load()
    check_call_kwargs(f'{where}.{name}', cls, kwargs)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f'{where}.{name}', kwargs, str(error)) from error
