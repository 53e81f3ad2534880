"""Which modules a LoRA configuration selects: PEFT's rules (peft 0.16), in one place.

The rules work on module names relative to the user's model (what PEFT's ``named_modules()`` gives). A module
becomes an adapter target when, in this order (PEFT's ``check_target_module_exists``):

1. it is not excluded by ``exclude_modules`` (:func:`is_excluded`);
2. it is not kept for ``modules_to_save`` (:func:`is_guarded_by_modules_to_save`);
3. it matches ``target_modules`` (:func:`matches_target_modules`), and for a suffix match of a list, its block
   index is in ``layers_to_transform`` (:func:`block_index`).

Separately, ``modules_to_save`` trains in full every module whose name *ends with* an entry, a plain string
suffix (:func:`is_saved`): ``'classifier'`` also saves ``pre_classifier``. Step 2 instead uses a dot boundary, so
such a module can be matched by both rules; PEFT then fails while wrapping it (``TypeError``), and LoRAInject
refuses it before changing anything.

Example:
    >>> is_target('model.layers.1.self_attn.q_proj', ['q_proj'], layers_to_transform=[1])
    True
    >>> saved_modules(['pre_classifier', 'classifier', 'distilbert.embeddings'], ['classifier'])
    ['pre_classifier', 'classifier']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Optional, Union

__all__ = [
    'block_index',
    'is_excluded',
    'is_guarded_by_modules_to_save',
    'is_saved',
    'is_target',
    'matches_name_list',
    'matches_target_modules',
    'saved_modules',
]

Names = Union[str, Sequence[str]]  # a regex (full match) or a list of names / name suffixes
LayersToTransform = Optional[Union[int, Sequence[int]]]
LayersPattern = Optional[Union[str, Sequence[str]]]


def matches_name_list(name: str, entries: Iterable[str]) -> bool:
    """PEFT's list rule (``target_modules``, ``exclude_modules``): ``name`` equals an entry or ends with
    ``'.' + entry``.

    Example:
        >>> matches_name_list('model.layers.0.self_attn.q_proj', ['q_proj']), matches_name_list('xq_proj', ['q_proj'])
        (True, False)
    """
    return any(name == entry or name.endswith('.' + entry) for entry in entries)


def is_excluded(name: str, exclude_modules: Optional[Names]) -> bool:
    """``exclude_modules``: a regex must match the whole name; a list follows :func:`matches_name_list`.

    Example:
        >>> is_excluded('model.layers.0.mlp.up_proj', r'.*\\.mlp\\..*'), is_excluded('lm_head', ['head'])
        (True, False)
    """
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return matches_name_list(name, exclude_modules)


def is_guarded_by_modules_to_save(name: str, modules_to_save: Optional[Sequence[str]]) -> bool:
    """Whether ``modules_to_save`` keeps ``name`` from being adapted: some entry ``m`` (a regex, as in PEFT)
    satisfies ``re.match(rf'(^|.*\\.){m}($|\\..*)', name)``, i.e. it is the module itself, or a module inside it,
    with a dot boundary on both sides.

    Example:
        >>> [is_guarded_by_modules_to_save(n, ['classifier']) for n in ('classifier.dense', 'pre_classifier')]
        [True, False]
    """
    return any(re.match(rf'(^|.*\.){entry}($|\..*)', name) for entry in modules_to_save or ())


def block_index(name: str, layers_pattern: LayersPattern = None) -> Optional[int]:
    """The block index PEFT reads from ``name`` for ``layers_to_transform``, or ``None``.

    Without ``layers_pattern`` (``None`` or empty): the number in the first ``.<container>.<i>.`` of the name. With
    it (a regex or a list of them, tried in order, the first that matches wins): the number in the first
    ``<pattern>.<i>.`` at the start of the name or after a dot. The number must be followed by a dot, so it is never
    the module's own name. The first index is the block's, not a nested one (an MoE expert's in
    ``model.layers.1.mlp.experts.0.up_proj``), as in PEFT 0.21; PEFT 0.16 read the last.

    Example:
        >>> block_index('model.layers.3.mlp.up_proj'), block_index('transformer.h.1.attn.c_attn', 'h')
        (3, 1)
    """
    if not layers_pattern:
        match = re.match(r'.*?\.[^.]*\.(?P<index>\d+)\.', name)
        return None if match is None else int(match.group('index'))
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
        match = re.match(rf'(?:^|.*?\.){pattern}\.(?P<index>\d+)\.', name)
        if match is not None:
            return int(match.group('index'))  # named: the pattern may have groups of its own
    return None


def matches_target_modules(
    name: str,
    target_modules: Names,
    layers_to_transform: LayersToTransform = None,
    layers_pattern: LayersPattern = None,
) -> bool:
    """``target_modules`` alone: a regex must match the whole name (``layers_to_transform`` does not apply); a list
    matches a name equal to an entry (``layers_to_transform`` is not consulted either) or ending with
    ``'.' + entry``, and then, when ``layers_to_transform`` is given, only inside a block it lists.

    Example:
        >>> matches_target_modules('model.layers.0.self_attn.q_proj', ['q_proj'], layers_to_transform=[1])
        False
        >>> matches_target_modules('model.layers.0.self_attn.q_proj', ['model.layers.0.self_attn.q_proj'], [1])
        True
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not any(name.endswith('.' + entry) for entry in target_modules):
        return False
    if layers_to_transform is None or (not isinstance(layers_to_transform, int) and not layers_to_transform):
        return True
    index = block_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def is_target(
    name: str,
    target_modules: Names,
    *,
    exclude_modules: Optional[Names] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    layers_to_transform: LayersToTransform = None,
    layers_pattern: LayersPattern = None,
) -> bool:
    """The whole target rule (PEFT's ``check_target_module_exists``): not excluded, not kept for
    ``modules_to_save``, and matching ``target_modules`` (resolved: no ``None``, no ``'all-linear'``).

    Example:
        >>> is_target('model.layers.0.mlp.up_proj', ['up_proj'], exclude_modules=['layers.0.mlp.up_proj'])
        False
    """
    if is_excluded(name, exclude_modules) or is_guarded_by_modules_to_save(name, modules_to_save):
        return False
    return matches_target_modules(name, target_modules, layers_to_transform, layers_pattern)


def is_saved(name: str, modules_to_save: Optional[Sequence[str]]) -> bool:
    """``modules_to_save``: ``name`` ends with an entry, as a plain string (PEFT's ``_set_trainable``:
    ``any(key.endswith(entry) ...)``), with no dot boundary.

    Example:
        >>> is_saved('pre_classifier', ['classifier']), is_saved('classifier.dense', ['classifier'])
        (True, False)
    """
    return bool(name) and any(name.endswith(entry) for entry in modules_to_save or ())


def saved_modules(names: Iterable[str], modules_to_save: Optional[Sequence[str]]) -> list[str]:
    """The modules trained in full, in the order of ``names``: those :func:`is_saved` selects, but for a module
    inside another selected one (the outer module already trains whole).

    Example:
        >>> saved_modules(['classifier', 'classifier.out.classifier'], ['classifier'])
        ['classifier']
    """
    saved: list[str] = []
    for name in names:
        if is_saved(name, modules_to_save) and not any(name.startswith(outer + '.') for outer in saved):
            saved.append(name)
    return saved
