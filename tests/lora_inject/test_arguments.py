"""Constructor arguments are checked on construction (wrong type or unknown choice: an error naming the argument),
and the algorithm declares exactly the events it can act at."""

from __future__ import annotations

import inspect
import typing
from typing import Literal, get_args, get_origin

import pytest
from composer.core import Event

from composer_thaw.core.validation import ConfigTypeError
from composer_thaw.lora_inject import LoRAConfig, LoRAInject

WRONG = {
    'config': 8,  # LoRAInject(8): the rank is r=8 (the config's fields are keyword options)
    'r': '8',
    'lora_alpha': 'sixteen',
    'target_modules': {'q_proj': True},
    'exclude_modules': {'q_proj': True},
    'layers_to_transform': 'all',
    'layers_pattern': 3,
    'rank_pattern': ['q_proj', 4],
    'alpha_pattern': 3.5,
    'lora_dropout': '0.1',
    'use_rslora': {'not': 'valid'},
    'use_dora': 'yes',
    'init': 3,
    'bias': None,
    'modules_to_save': 'lm_head',
    'enable_slices': [True, False, True],
    'task_type': 7,
    'save_adapter_to': 3,
    'save_merged_to': ['out'],
    'checkpoint_trainable_only': 'yes',
    'master_weights': 32,
}


def test_every_constructor_argument_has_a_wrong_type_case():
    assert set(WRONG) == set(inspect.signature(LoRAInject.__init__).parameters) - {'self'}


@pytest.mark.parametrize('argument', sorted(WRONG))
def test_a_wrong_type_is_refused_naming_the_argument(argument):
    # checked against the annotations before the constructor runs, as a recipe is (a TypeError and a ValueError)
    with pytest.raises(ConfigTypeError, match=rf'^algorithms\.lora_inject\.{argument} = ') as error:
        LoRAInject(**{'r': 4, 'target_modules': ['q_proj'], argument: WRONG[argument]})
    assert ': expected ' in str(error.value)


@pytest.mark.parametrize('argument', sorted(set(WRONG) & set(LoRAConfig.field_names())))
def test_the_config_refuses_a_wrong_type_naming_the_argument(argument):
    with pytest.raises((TypeError, ValueError), match=rf'^{argument}=') as error:
        LoRAConfig(**{'r': 4, 'target_modules': ['q_proj'], argument: WRONG[argument]})
    assert 'is invalid' in str(error.value)


@pytest.mark.parametrize('argument', ['use_rslora', 'use_dora'])
@pytest.mark.parametrize('value', [1, 0, 'true', None])
def test_flags_must_be_bools(argument, value):
    with pytest.raises(TypeError, match=rf'{argument} = .*: expected true or false'):
        LoRAInject(**{argument: value})
    with pytest.raises(TypeError, match=rf'{argument}=.* must be a bool'):
        LoRAConfig(**{argument: value})


@pytest.mark.parametrize('argument', ['init', 'bias'])
def test_an_unknown_choice_lists_every_valid_one(argument):
    annotation = typing.get_type_hints(LoRAInject.__init__)[argument]
    assert get_origin(annotation) is Literal
    with pytest.raises(ValueError) as error:
        LoRAInject(**{argument: 'no-such-choice'})
    assert argument in str(error.value)
    assert all(repr(choice) in str(error.value) for choice in get_args(annotation))


@pytest.mark.parametrize(
    'argument, value, message',
    [
        ('rank_pattern', {3: 4}, r'rank_pattern=\{3: 4\} is invalid: give a dict'),
        ('alpha_pattern', {'q_proj': 'x'}, r"alpha_pattern\['q_proj'\]='x' is invalid"),
        ('enable_slices', {'c_attn': 'TFT'}, r"enable_slices\['c_attn'\]='TFT' is invalid"),
    ],
)
def test_pattern_mappings_are_checked_key_and_value(argument, value, message):
    with pytest.raises((TypeError, ValueError), match=message):
        LoRAConfig(**{argument: value})
    with pytest.raises(ConfigTypeError, match=rf'^algorithms\.lora_inject\.{argument} = .*: expected a mapping'):
        LoRAInject(**{argument: value})


def test_events_are_exactly_those_match_accepts():
    saving = LoRAInject(r=4, target_modules=['q_proj'], save_adapter_to='out')
    plain = LoRAInject(r=4, target_modules=['q_proj'])
    assert set(LoRAInject.events) == {Event.INIT, Event.BEFORE_LOAD, Event.FIT_END}
    assert {event for event in Event if saving.match(event, None)} == set(LoRAInject.events)
    assert {event for event in Event if plain.match(event, None)} == {Event.INIT, Event.BEFORE_LOAD}
