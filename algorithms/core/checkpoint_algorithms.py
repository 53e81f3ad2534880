"""Which registered algorithms (ours and third parties') a Composer checkpoint needs, checked before resuming.

Composer re-adds only its own ``required_on_load`` algorithms when it loads a checkpoint. Resuming a run that
used one of them without it would train the wrong parameters or load adapter weights nowhere, so the recipe
runner refuses it, naming the missing algorithms; Python users can call :func:`check_checkpoint_algorithms`
themselves, or rebuild the algorithms with :func:`algorithms_in_checkpoint`.

Example:
    >>> from composer_thaw import RegexFreeze
    >>> freeze = RegexFreeze(trainable=['lm_head'])
    >>> state = {'algorithms': [('RegexFreeze', freeze.state_dict())]}  # what Composer records of the algorithms
    >>> torch.save({'state': state}, 'ep1-ba100-rank0.pt')
    >>> algorithms_in_checkpoint('ep1-ba100-rank0.pt')
    [RegexFreeze(trainable=['lm_head'])]
    >>> check_checkpoint_algorithms('ep1-ba100-rank0.pt', [freeze])
    >>> check_checkpoint_algorithms('ep1-ba100-rank0.pt', [])
    Traceback (most recent call last):
    ValueError: checkpoint 'ep1-ba100-rank0.pt' was trained with RegexFreeze(trainable=['lm_head']), which this run
    does not use. ...
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from composer.core import Algorithm

from composer_thaw.core.registry import algorithm_registry
from composer_thaw.core.resume_checks import check_resume_config
from composer_thaw.core.state import eval_repr

__all__ = [
    'algorithms_in_checkpoint',
    'check_checkpoint_algorithms',
    'check_resume_compatibility',
    'recorded_algorithms',
]


def _registered_class_names() -> dict[str, str]:
    return {
        entry.target.partition(':')[2]: name
        for name, entry in algorithm_registry().items()
        if entry.source != 'composer'
    }


def recorded_algorithms(path: Union[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    """``(class name, state)`` of each algorithm recorded in a Composer checkpoint file."""
    with open(path, 'rb') as file:
        mappable = file.read(2) == b'PK'  # a zip archive (torch.save's format since 1.6): tensors stay on disk
    checkpoint = torch.load(str(path), map_location='cpu', weights_only=False, mmap=mappable)
    return list(checkpoint.get('state', {}).get('algorithms', []))


def algorithms_in_checkpoint(path: Union[str, Path]) -> list[Algorithm]:
    """Rebuild the registered algorithms (ours and third parties') a checkpoint was trained with, from their
    recorded ``repr``."""
    registered = _registered_class_names()
    return [eval_repr(state['repr']) for class_name, state in recorded_algorithms(path) if class_name in registered]


def check_checkpoint_algorithms(path: Union[str, Path], algorithms: Sequence[Algorithm]) -> None:
    """Raise ``ValueError`` naming each registered algorithm the checkpoint used that ``algorithms`` lacks."""
    present = {type(a).__name__ for a in algorithms}
    registered = _registered_class_names()
    missing = [(name, state) for name, state in recorded_algorithms(path) if name in registered and name not in present]
    if missing:
        listed = ', '.join(state.get('repr', name) for name, state in missing)
        raise ValueError(
            f'checkpoint {str(path)!r} was trained with {listed}, which this run does not use. Composer restores only '
            'its own algorithms; add them (recipe key `algorithms:` or `Trainer(algorithms=[...])`, e.g. '
            '`composer_thaw.core.checkpoint_algorithms.algorithms_in_checkpoint(path)`), or load only its weights '
            '(Trainer(load_weights_only=True), recipe key load_weights_only: true).',
        )


def check_resume_compatibility(path: Union[str, Path], algorithms: Sequence[Algorithm]) -> None:
    """Raise :class:`~composer_thaw.core.resume_checks.ResumeConfigError` if an algorithm of ``algorithms`` is
    configured otherwise than when it wrote its state into the checkpoint at ``path``, in a field that shaped that
    state (its ``resume_fields``): the check each algorithm makes when the state loads, made before anything is built.
    """
    by_class = {type(algorithm).__name__: algorithm for algorithm in algorithms}
    for class_name, state in recorded_algorithms(path):
        algorithm = by_class.get(class_name)
        if algorithm is not None and hasattr(algorithm, 'resume_fields') and isinstance(state, dict):
            check_resume_config(algorithm, state, checkpoint=str(path))
