"""Train exactly the parameters (and tensor rows) that regexes name; freeze everything else for real.

Example:
    >>> from composer_thaw.regex_freeze import RegexFreeze, apply_regex_freeze, freeze_preview
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=4)
    >>> print(freeze_preview(model, trainable=['lm_head', 'model.layers.3']))
    module ...
    >>> selection = apply_regex_freeze(model, None, trainable=['lm_head', 'model.layers.3'])  # without a Trainer
    >>> RegexFreeze(trainable=['lm_head', 'model.layers.3'])  # with one: Trainer(algorithms=[...])
    RegexFreeze(trainable=['lm_head', 'model.layers.3'])
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
