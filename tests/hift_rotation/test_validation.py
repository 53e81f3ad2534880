"""Bad options fail before any training step with a message naming the argument, the value and what is valid;
errors that need the model fail at Trainer construction and leave model and optimizer untouched."""

from __future__ import annotations

import pytest
import torch
from composer.models import ComposerClassifier
from support import cpu_trainer, seeded_tiny_decoder
from torch import nn

from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.validation import ConfigError
from composer_thaw.hift_rotation import GroupRotation, HiFTRotation
from composer_thaw.hift_rotation.hift_rotation import EXAMPLES


@pytest.mark.parametrize(
    'kwargs,error,message',
    [
        # wrong types and choices: checked against the annotations first, as in a recipe
        (
            {'strategy': 'top-down'},
            ValueError,
            r"^algorithms\.hift_rotation\.strategy = 'top-down': expected one of 'down2up', 'up2down', 'random'\.",
        ),
        ({'group_size': 0}, ValueError, r'group_size=0 must be >= 1'),
        ({'group_size': True}, TypeError, r'hift_rotation\.group_size = True: expected an integer'),
        ({'steps_per_group': 0}, ValueError, r'steps_per_group=0 must be >= 1'),
        ({'freeze': [-1]}, ValueError, 'freeze index -1 is out of range'),
        ({'freeze': ['embeddings']}, TypeError, r"freeze = \['embeddings'\]: expected a list of an integer or null"),
        ({'groups': []}, ValueError, r'groups=\[\] is empty'),
        ({'offload': 'yes'}, TypeError, r"offload = 'yes': expected true or false"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        HiFTRotation(**kwargs)


def test_group_size_larger_than_the_model_fails_at_trainer_init_untouched():
    model = seeded_tiny_decoder()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r'group_size=8 is larger than the model: only 7 units rotate'):
        cpu_trainer(model, [HiFTRotation(group_size=8)], optimizer=optimizer)
    assert all(p.requires_grad for p in model.parameters()) and not optimizer.state


def test_freeze_index_out_of_range_lists_the_units():
    with pytest.raises(ValueError, match=r'freeze index 9 is out of range: this model has 7 units.*6: lm_head'):
        cpu_trainer(seeded_tiny_decoder(), [HiFTRotation(freeze=[9])])


def test_model_without_repeated_blocks_says_how_to_give_groups():
    model = ComposerClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r'No repeated blocks found.*groups=\['):
        GroupRotation(model, optimizer)
    rotation = GroupRotation(model, optimizer, groups=[r'^1\.', r'^3\.'])
    assert rotation.active_names == [r'^1\.']


def test_recipe_kwargs_are_type_checked():
    with pytest.raises(ConfigError, match='group_size'):
        build_algorithm('hift_rotation', {'group_size': 'two'})
    assert build_algorithm('hift_rotation', {'strategy': 'random', 'freeze': [0]}) == HiFTRotation(
        strategy='random', freeze=[0]
    )


@pytest.mark.parametrize('kwargs', EXAMPLES)
def test_examples_build_and_repr_evals_back(kwargs):
    algorithm = HiFTRotation(**kwargs)
    assert eval(repr(algorithm)) == algorithm
