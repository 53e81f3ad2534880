"""Which algorithms compose and which are refused, decided in one place from what each algorithm says it owns.

An algorithm declares its :class:`Claim`\\ s with a method ``owns(self) -> tuple[Claim, ...]``: for each *resource*
(e.g. :data:`BASE_PARAMETERS`, whether the model's own parameters train; :data:`ADAPTERS`, the parameters an
adapter algorithm adds) what it does to it (an :data:`Access`). Two algorithms conflict when they claim the same
resource with accesses that :data:`COMPOSING_ACCESSES` does not list as composing: e.g. two algorithms that each
``'set'`` which parameters train would override each other, whereas one that only ``'narrow'``\\ s (freezes more,
never unfreezes) composes with one that ``'set'``\\ s. No algorithm needs to know the others: each calls
:func:`check_compatibility` at ``Event.INIT`` (before anything changes), and the first of a conflicting pair to
run refuses the pair with a message naming both, the resource, and each side's advice.

=============================  ================================================  =====================================
algorithm                      :data:`BASE_PARAMETERS`                           :data:`ADAPTERS`
=============================  ================================================  =====================================
``RegexFreeze``                ``'sets'`` (its patterns decide, once)            ``'sets'``
``LayerFreezing``              ``'narrows'`` (freezes more units over time)      ``'narrows'``
``LoRAInject``                 ``'sets'`` (everything outside the adapters)      ``'provides'`` (creates them)
``HiFTRotation``               ``'rotates'`` (one group of units per step)       --
``HiFTRotation(lora=True)``    --                                                ``'rotates'``
=============================  ================================================  =====================================

So ``LoRAInject`` composes with ``LayerFreezing`` and with ``HiFTRotation(lora=True)``, ``RegexFreeze`` with
``LayerFreezing``; ``LoRAInject`` + ``RegexFreeze``, and ``HiFTRotation`` + anything else that decides what trains,
are refused. Composer's own algorithms cannot declare anything: :data:`COMPOSER_CLAIMS` declares, here, the one that
decides what trains (Composer's ``LayerFreezing``, which only freezes). Any other algorithm without ``owns`` claims
nothing and is never refused here.

Example:
    >>> from composer.core import Algorithm, Event
    >>> from composer_thaw import HiFTRotation, LoRAInject
    >>> from composer_thaw.core.state import ConfigRepr
    >>> class FreezeEmbeddings(ConfigRepr, Algorithm):
    ...     def owns(self) -> tuple[Claim, ...]:
    ...         return (Claim(BASE_PARAMETERS, 'narrows'),)  # only ever freezes: composes with LoRA, not with HiFT
    ...     def match(self, event, state):
    ...         return event == Event.INIT
    ...     def apply(self, event, state, logger):
    ...         check_compatibility(self, state.algorithms, 'give one FreezeEmbeddings.')
    >>> conflict(LoRAInject(), FreezeEmbeddings()) is None
    True
    >>> print(conflict(HiFTRotation(), FreezeEmbeddings()))
    FreezeEmbeddings cannot be combined with HiFTRotation: ...
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, get_args

from composer_thaw.core.state import refuse_duplicates

__all__ = [
    'ADAPTERS',
    'BASE_PARAMETERS',
    'COMPOSER_CLAIMS',
    'COMPOSING_ACCESSES',
    'Access',
    'Claim',
    'check_compatibility',
    'claims_of',
    'compatibility_table',
    'conflict',
]

BASE_PARAMETERS = 'base_parameters'
"""Whether the model's own parameters train: their ``requires_grad`` and their place in the optimizer's param groups."""

ADAPTERS = 'adapters'
"""Whether the parameters an adapter algorithm adds (LoRA's ``lora_A``/``lora_B``) train."""

_RESOURCE_WORDS = {
    BASE_PARAMETERS: "which of the model's own parameters train",
    ADAPTERS: 'which adapter parameters train',
}

Access = Literal['provides', 'sets', 'narrows', 'rotates']
"""What an algorithm does to a resource:

- ``'provides'``: creates it (LoRA creates the adapters, trainable);
- ``'sets'``: decides it once, both ways (trainable or frozen);
- ``'narrows'``: only ever takes away (freezes more over time, never unfreezes);
- ``'rotates'``: switches it on and off during training (one group per step).
"""

ACCESSES: tuple[str, ...] = get_args(Access)

COMPOSING_ACCESSES: frozenset[frozenset[str]] = frozenset(
    {
        frozenset({'sets', 'narrows'}),  # freezing grows on top of a fixed selection
        frozenset({'narrows'}),  # two narrowings: each only freezes
        frozenset({'provides', 'narrows'}),  # adapters of frozen units stop
        frozenset({'provides', 'rotates'}),  # the rotation runs over the adapters
    }
)
"""Pairs of accesses to one resource that compose; every other pair on the same resource is refused."""

_WHY = {
    frozenset({'sets'}): 'each decides on its own which train, so the later would override the earlier',
    frozenset({'rotates'}): 'each switches its own groups on and off, undoing the other',
    frozenset({'sets', 'rotates'}): 'the rotation would train what the other froze, or the other would freeze the '
    'active group',
    frozenset({'narrows', 'rotates'}): 'the rotation would train again what the other froze, or the other would '
    'freeze the active group',
    frozenset({'provides', 'sets'}): 'the selection would freeze what the other created to train (it matches none '
    'of its trainable patterns), or train what the other keeps frozen',
    frozenset({'provides'}): 'both create them, each over the other',
}

Advice = Union[str, Callable[['Claim'], str]]


@dataclass(frozen=True)
class Claim:
    """What an algorithm does to one resource, and what it advises when that refuses a partner.

    Args:
        resource: what is owned, e.g. :data:`BASE_PARAMETERS` or :data:`ADAPTERS` (a third party may name its own).
        access: what the algorithm does to it (:data:`Access`).
        advice: what to do instead when this claim refuses a pair: text, or a function of the partner's claim.
        trains: regexes on parameter names that this algorithm makes trainable, where it knows them (partners may
            use them in their advice, as LoRA turns RegexFreeze's trainable modules into ``modules_to_save``).
    """

    resource: str
    access: Access
    advice: Advice = ''
    trains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.resource, str) or not self.resource:
            raise ValueError(f'Claim resource={self.resource!r} must be a non-empty string, e.g. {BASE_PARAMETERS!r}.')
        if self.access not in ACCESSES:
            raise ValueError(f'Claim access={self.access!r} is not one of {list(ACCESSES)}.')

    def advice_for(self, partner: Claim) -> str:
        return self.advice(partner) if callable(self.advice) else self.advice


_COMPOSER_FREEZING_ADVICE = "Composer's LayerFreezing only freezes; drop it, or drop the rotation."

COMPOSER_CLAIMS: dict[str, tuple[Claim, ...]] = {
    'composer.algorithms.layer_freezing.layer_freezing.LayerFreezing': (
        Claim(BASE_PARAMETERS, 'narrows', _COMPOSER_FREEZING_ADVICE),
        Claim(ADAPTERS, 'narrows', _COMPOSER_FREEZING_ADVICE),
    ),
}
"""Claims of Composer's algorithms (which have no ``owns``), by ``module.QualifiedName``."""


def claims_of(algorithm: Any) -> tuple[Claim, ...]:
    """What ``algorithm`` declares it owns (its ``owns()``; for Composer's algorithms :data:`COMPOSER_CLAIMS`), or
    ``()`` for an algorithm that declares nothing."""
    owns = getattr(algorithm, 'owns', None)
    if not callable(owns):
        return COMPOSER_CLAIMS.get(f'{type(algorithm).__module__}.{type(algorithm).__qualname__}', ())
    claims = tuple(owns())
    for claim in claims:
        if not isinstance(claim, Claim):
            raise TypeError(f'{type(algorithm).__name__}.owns() must return Claim objects, got {claim!r}.')
    return claims


def _access_words(access: str) -> str:
    return {
        'provides': 'creates them',
        'sets': 'decides them once',
        'narrows': 'freezes more of them over time',
        'rotates': 'switches them on and off during training',
    }[access]


def conflict(first: Any, second: Any) -> Optional[str]:
    """Why ``first`` and ``second`` cannot train together, or ``None`` when they compose.

    Symmetric, and the text does not depend on the argument order: the two are named in the order of their class
    names, so a refusal reads the same whichever algorithm of the pair checks first.
    """
    first, second = sorted((first, second), key=lambda algorithm: type(algorithm).__name__)
    for mine, theirs in itertools.product(claims_of(first), claims_of(second)):
        if mine.resource != theirs.resource or frozenset({mine.access, theirs.access}) in COMPOSING_ACCESSES:
            continue
        what = _RESOURCE_WORDS.get(mine.resource, mine.resource)
        a, b = type(first).__name__, type(second).__name__
        why = _WHY.get(frozenset({mine.access, theirs.access}), 'they would overrule each other')
        advice = ' '.join(text for text in (mine.advice_for(theirs), theirs.advice_for(mine)) if text)
        return (
            f'{a} cannot be combined with {b}: both own {what} ({a} {_access_words(mine.access)}, {b} '
            f'{_access_words(theirs.access)}): {why}. {advice}'
        ).rstrip()
    return None


def check_compatibility(algorithm: Any, algorithms: Sequence[Any], duplicate_advice: str) -> None:
    """Raise ``ValueError`` if ``algorithm`` appears twice in ``algorithms`` or conflicts with another of them.

    Call it at ``Event.INIT`` with the Trainer's list (``state.algorithms``), before changing anything.

    Args:
        algorithm: the algorithm checking.
        algorithms: every algorithm of the Trainer (``algorithm`` included).
        duplicate_advice: what to do instead of listing ``algorithm`` twice.
    """
    refuse_duplicates(algorithm, algorithms, duplicate_advice)
    for other in algorithms:
        if other is algorithm:
            continue
        reason = conflict(algorithm, other)
        if reason is not None:
            raise ValueError(reason)


def compatibility_table(algorithms: Iterable[Any]) -> dict[tuple[str, str], Optional[str]]:
    """``{(repr a, repr b): None if they compose else the refusal}`` for every pair of ``algorithms``."""
    listed = list(algorithms)
    return {(repr(a), repr(b)): conflict(a, b) for a, b in itertools.combinations(listed, 2)}
