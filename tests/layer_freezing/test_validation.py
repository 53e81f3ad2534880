"""Bad arguments and unfreezable models fail with messages naming the value, before any training step and without
touching the model."""

from __future__ import annotations

import pytest
from composer.models import ComposerClassifier
from torch import nn

from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.validation import ConfigError
from composer_thaw.layer_freezing import LayerFreezing, freeze_layers
from composer_thaw.layer_freezing.layer_freezing import (
    EXAMPLES,
    linear_schedule,  # noqa: F401  (used by eval(repr))
)


@pytest.mark.parametrize(
    'kwargs,message',
    [
        ({'freeze_start': 1.5}, r'freeze_start=1\.5 is outside \[0, 1\]'),
        ({'freeze_start': -0.1}, r'freeze_start=-0\.1 is outside \[0, 1\]'),
        ({'freeze_level': 2}, r'freeze_level=2 is outside \[0, 1\]'),
        # wrong types and choices: checked against the annotations first, as in a recipe
        ({'granularity': 'layer'}, r"layer_freezing\.granularity = 'layer': expected one of 'leaf', 'block'"),
        ({'interval': 0}, r"interval=0 must be 'epoch' or a positive number of batches"),
        ({'interval': 'batch'}, r"interval = 'batch': expected one of 'epoch' or an integer"),
        ({'interval': True}, r"interval = True: expected one of 'epoch' or an integer"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value_and_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerFreezing(**kwargs)


def test_non_numbers_and_non_callables_are_type_errors():
    with pytest.raises(TypeError, match=r"freeze_level = 'all': expected a number"):
        LayerFreezing(freeze_level='all')  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule='cosine'"):
        LayerFreezing(schedule='cosine')  # type: ignore[arg-type]


def test_functional_form_validates_too(make_model):
    with pytest.raises(ValueError, match=r'freeze_level=1\.5'):
        freeze_layers(make_model(), None, 0.5, freeze_level=1.5)


def _two_layer_classifier():
    return ComposerClassifier(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), num_classes=2)


def test_a_model_with_fewer_than_two_freezable_units_fails_at_init_untouched(make_trainer):
    model = _two_layer_classifier()
    with pytest.raises(ValueError, match=r'has 1 freezable unit\(s\) at granularity=.leaf.*needs at least 2'):
        make_trainer(model, [LayerFreezing()])
    assert all(p.requires_grad for p in model.parameters())


def test_block_granularity_on_a_model_without_repeated_blocks_suggests_leaf():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"granularity='block' needs repeated blocks.*granularity='leaf'"):
        freeze_layers(model, None, 1.0, granularity='block')
    assert all(p.requires_grad for p in model.parameters())


def test_yaml_kwargs_are_type_checked_from_the_annotations():
    assert build_algorithm('layer_freezing', {'interval': 10, 'granularity': 'block'}) == LayerFreezing(
        interval=10, granularity='block'
    )
    with pytest.raises(ConfigError, match='interval'):
        build_algorithm('layer_freezing', {'interval': '10ba'})
    with pytest.raises(ConfigError, match='granularity'):
        build_algorithm('layer_freezing', {'granularity': 'layers'})


@pytest.mark.parametrize('kwargs', EXAMPLES)
def test_examples_build_and_repr_evals_back(kwargs):
    algorithm = LayerFreezing(**kwargs)
    assert eval(repr(algorithm)) == algorithm
    assert LayerFreezing().find_unused_parameters
