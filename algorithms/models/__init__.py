"""Models that need no download (:mod:`~composer_thaw.models.builtin`, re-exported here) and the vision classifiers
(:mod:`~composer_thaw.models.vision`).

Example:
    >>> from composer_thaw.models import tiny_decoder
    >>> model = tiny_decoder('llama', num_layers=2)
    >>> type(model).__name__, type(model.model).__name__
    ('HuggingFaceModel', 'LlamaForCausalLM')
"""

from composer_thaw.models.builtin import *  # noqa: F403
from composer_thaw.models.builtin import __all__  # noqa: F401
