"""HiFTRotation: hierarchical full-parameter fine-tuning, one group of units per step, the rest's state offloaded.

Example:
    >>> from composer_thaw.hift_rotation import HiFTRotation, rotation_preview
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> print(rotation_preview(tiny_decoder(num_layers=2), group_size=2))
    index  unit ...
    >>> HiFTRotation(group_size=2, strategy='random')  # for Trainer(algorithms=[...])
    HiFTRotation(group_size=2, strategy='random')
"""

from composer_thaw.hift_rotation.hift_rotation import (
    GroupRotation,
    HiFTRotation,
    apply_hift_rotation,
    check_rotation_options,
)
from composer_thaw.hift_rotation.preview import rotation_preview
from composer_thaw.hift_rotation.queue import STRATEGIES, GroupQueue
from composer_thaw.hift_rotation.units import RotationPlan, plan_rotation, rotation_units

__all__ = [
    'STRATEGIES',
    'GroupQueue',
    'GroupRotation',
    'HiFTRotation',
    'RotationPlan',
    'apply_hift_rotation',
    'check_rotation_options',
    'plan_rotation',
    'rotation_preview',
    'rotation_units',
]
