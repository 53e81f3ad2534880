"""Progressive layer freezing that frees optimizer memory, skips frozen backward and resumes from checkpoints."""

from composer_thaw.layer_freezing.layer_freezing import (
    FreezeSchedule,
    LayerFreezing,
    freeze_layers,
    freeze_units,
    linear_schedule,
)
from composer_thaw.layer_freezing.units import FreezeUnit, freezable_units, parameters_to_freeze

__all__ = [
    'FreezeSchedule',
    'FreezeUnit',
    'LayerFreezing',
    'freezable_units',
    'freeze_layers',
    'freeze_units',
    'linear_schedule',
    'parameters_to_freeze',
]
