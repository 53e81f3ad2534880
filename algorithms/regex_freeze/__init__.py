"""Train exactly the parameters (and tensor rows) that regexes name; freeze everything else for real.

Example:
    >>> from composer_thaw.regex_freeze import RegexFreeze, apply_regex_freeze, freeze_preview
    >>> print(freeze_preview(model, trainable=['lm_head', 'model.layers.3']))
    >>> trainer = Trainer(model=model, ..., algorithms=[RegexFreeze(trainable=['lm_head', 'model.layers.3'])])
"""

from composer_thaw.regex_freeze.patterns import ParameterPattern, Selection, TensorSelection, select_parameters
from composer_thaw.regex_freeze.preview import freeze_preview
from composer_thaw.regex_freeze.regex_freeze import RegexFreeze, apply_regex_freeze

__all__ = [
    'ParameterPattern',
    'RegexFreeze',
    'Selection',
    'TensorSelection',
    'apply_regex_freeze',
    'freeze_preview',
    'select_parameters',
]
