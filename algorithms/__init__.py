"""composer-thaw: freezing, rotation and low-rank adaptation algorithms for MosaicML Composer.

Example:
    >>> from composer import Trainer
    >>> from composer_thaw import RegexFreeze
    >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration='1ep',
    ...                   algorithms=[RegexFreeze(trainable=['lm_head', 'model.layers.3'])])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.1.0'

# Public name -> sub-package; imported on first use so `import composer_thaw` stays light.
_PUBLIC = {
    'LayerFreezing': 'composer_thaw.layer_freezing',
    'freeze_layers': 'composer_thaw.layer_freezing',
    'RegexFreeze': 'composer_thaw.regex_freeze',
    'apply_regex_freeze': 'composer_thaw.regex_freeze',
    'HiFTRotation': 'composer_thaw.hift_rotation',
    'apply_hift_rotation': 'composer_thaw.hift_rotation',
    'LoRAInject': 'composer_thaw.lora_inject',
    'apply_lora': 'composer_thaw.lora_inject',
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
