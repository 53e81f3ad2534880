"""LoRAInject takes its adapters' configuration as one ``LoRAConfig``, as PEFT takes its ``LoraConfig``, or as that
config's fields, options of their own (a recipe's ``lora_inject: {r: 8, ...}``): the same algorithm either way (the
same adapters and state dict, the same ``repr``), never both at once; the field list lives in ``LoRAConfig`` alone;
and a checkpoint written when the fields were the constructor's own arguments (recorded as given) still resumes."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any

import pytest
import torch
import yaml
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.core.checkpoint_algorithms import check_resume_compatibility
from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.resume_checks import RESUME_CONFIG_KEY, ResumeConfigError
from composer_thaw.core.state import STATE_VERSION_KEY, eval_repr, init_arguments
from composer_thaw.core.validation import ConfigTypeError
from composer_thaw.lora_inject import LoRAConfig, LoRAInject, apply_lora, lora_config_of
from composer_thaw.lora_inject.lora_inject import EXAMPLES
from composer_thaw.utils.parameter_selection import user_module

OWN = ['save_adapter_to', 'save_merged_to', 'checkpoint_trainable_only', 'master_weights']


def test_the_options_are_the_config_and_its_fields_read_from_the_dataclass_plus_the_algorithms_own():
    fields = [field.name for field in dataclasses.fields(LoRAConfig)]
    assert list(inspect.signature(LoRAInject).parameters) == ['config', *fields, *OWN]
    assert set(LoRAInject.resume_fields) == (set(fields) - {'lora_dropout'}) | {'master_weights'}
    algorithm = LoRAInject(r=4, lora_alpha=16)
    assert (algorithm.r, algorithm.lora_alpha, algorithm.rank_pattern) == (4, 16, {})  # read through the config
    with pytest.raises(AttributeError):
        algorithm.r = 8  # type: ignore[misc]  # one value, in the config


@pytest.mark.parametrize('fields', EXAMPLES, ids=range(len(EXAMPLES)))
def test_a_config_object_is_the_algorithm_its_fields_make(fields: dict[str, Any]):
    flat = LoRAInject(**copy.deepcopy(fields), save_adapter_to='out')
    config = LoRAConfig(**copy.deepcopy(fields))
    given = LoRAInject(config, save_adapter_to='out')
    assert given == flat and repr(given) == repr(flat) and given.config == flat.config == config
    assert repr(given).startswith(f'LoRAInject(r={fields["r"]}, ') and 'config' not in repr(given)
    assert eval_repr(repr(given)) == given and pickle.loads(pickle.dumps(given)) == given
    assert given.state_dict() == flat.state_dict()
    text = yaml.safe_dump({'lora_inject': init_arguments(given)})
    assert build_algorithm('lora_inject', yaml.safe_load(text)['lora_inject']) == given
    assert LoRAInject(config=dataclasses.asdict(config), save_adapter_to='out') == given  # a mapping of its fields
    config.r = 64
    assert given.config.r == fields['r'], 'the algorithm keeps a copy of the config'


def test_the_same_adapters_train_the_same_way_from_either_form():
    fields = dict(r=4, target_modules=['q_proj', 'v_proj'], rank_pattern={'v_proj': 2}, modules_to_save=['lm_head'])
    states = []
    for algorithm in (LoRAInject(**fields), LoRAInject(LoRAConfig(**fields))):
        model = seeded_tiny_decoder(num_layers=2)
        cpu_trainer(model, [algorithm], max_duration='2ba').fit()
        states.append(user_module(model).state_dict())
    flat, given = states
    assert flat.keys() == given.keys() and any(name.endswith('.lora_B') for name in flat)
    assert all(torch.equal(flat[name], given[name]) for name in flat)


@pytest.mark.parametrize(
    'call',
    [
        lambda: LoRAInject(LoRAConfig(r=16), r=8),
        lambda: LoRAInject(config=LoRAConfig(r=16), r=8, lora_alpha=4),
        lambda: build_algorithm('lora_inject', {'config': {'r': 16}, 'r': 8}),
    ],
    ids=['positional', 'keyword, two fields', 'recipe'],
)
def test_a_field_given_both_ways_is_refused_in_one_line_naming_it(call):
    with pytest.raises(ConfigTypeError) as error:
        call()
    message = str(error.value)
    assert isinstance(error.value, ValueError) and '\n' not in message
    assert error.value.key == 'algorithms.lora_inject.r' and message.startswith('algorithms.lora_inject.r = 8: ')
    assert 'given both in config and as an option of its own' in message and 'LoRAConfig(r=8, ...)' in message


def test_apply_lora_takes_either_form_and_refuses_both():
    model = seeded_tiny_decoder(num_layers=2)
    apply_lora(model, None, LoRAConfig(r=2, target_modules=['q_proj']))
    assert lora_config_of(model) == LoRAConfig(r=2, target_modules=['q_proj'])
    with pytest.raises(ConfigTypeError, match=r'^r = 2: given both in config'):
        apply_lora(seeded_tiny_decoder(num_layers=2), None, LoRAConfig(r=2), r=2)


@pytest.mark.parametrize(
    'options, message',
    [
        ({'target_modlues': ['q_proj']}, "LoRAInject has no option 'target_modlues' (did you mean 'target_modules'"),
        ({'r': '8'}, "algorithms.lora_inject.r = '8': expected an integer."),
        ({'config': 8}, 'algorithms.lora_inject.config = 8: expected a mapping with keys r, lora_alpha, '),
        (
            {'config': {'target_modlues': ['q_proj']}},
            "algorithms.lora_inject.config.target_modlues = ['q_proj']: unknown key 'target_modlues' (did you mean "
            "'target_modules'?)",
        ),
    ],
    ids=['misspelled field', 'wrong type', 'no config', 'misspelled key of a config mapping'],
)
def test_options_are_checked_by_name_and_type_whichever_form(options: dict[str, Any], message: str):
    for build in (lambda: LoRAInject(**options), lambda: build_algorithm('lora_inject', options)):
        with pytest.raises(ConfigTypeError) as error:
            build()
        assert message in str(error.value)
    if 'target_modlues' in options:
        assert 'valid options: config, r, lora_alpha, target_modules,' in str(error.value)


def test_null_for_a_mapping_field_is_its_empty_default_as_before():
    assert LoRAInject(rank_pattern=None, alpha_pattern=None, enable_slices=None) == LoRAInject()
    assert build_algorithm('lora_inject', {'rank_pattern': None}).config.rank_pattern == {}


# The state LoRAInject(r=4, target_modules=('v_proj', 'q_proj'), exclude_modules={'lm_head'}, layers_pattern='')
# wrote before its options became LoRAConfig's fields (its state_dict() at 5061b21, printed): the arguments as given.
OLD_STATE = {
    'repr': "LoRAInject(r=4, target_modules=('v_proj', 'q_proj'), exclude_modules={'lm_head'}, layers_pattern='')",
    STATE_VERSION_KEY: 1,
    RESUME_CONFIG_KEY: {
        'r': 4,
        'lora_alpha': 8,
        'target_modules': ['v_proj', 'q_proj'],
        'exclude_modules': {'lm_head'},
        'layers_to_transform': None,
        'layers_pattern': '',
        'rank_pattern': None,
        'alpha_pattern': None,
        'use_rslora': False,
        'use_dora': False,
        'init': 'kaiming',
        'bias': 'none',
        'modules_to_save': None,
        'enable_slices': None,
        'task_type': None,
        'master_weights': None,
    },
    'config': {
        'r': 4,
        'lora_alpha': 8,
        'target_modules': ['q_proj', 'v_proj'],
        'exclude_modules': ['lm_head'],
        'layers_to_transform': None,
        'layers_pattern': None,
        'rank_pattern': {},
        'alpha_pattern': {},
        'lora_dropout': 0.0,
        'use_rslora': False,
        'use_dora': False,
        'init': 'kaiming',
        'bias': 'none',
        'modules_to_save': None,
        'enable_slices': {},
        'task_type': None,
    },
}


@pytest.mark.parametrize(
    'resumed',
    [
        lambda: LoRAInject(r=4, target_modules=('v_proj', 'q_proj'), exclude_modules={'lm_head'}, layers_pattern=''),
        lambda: LoRAInject(r=4, target_modules=['v_proj', 'q_proj'], exclude_modules=['lm_head']),
        lambda: LoRAInject(LoRAConfig(r=4, target_modules=['v_proj', 'q_proj'], exclude_modules=['lm_head'])),
        lambda: eval_repr(OLD_STATE['repr']),
    ],
    ids=['as given then', 'flat', 'config object', 'from its repr'],
)
def test_a_checkpoint_written_before_resumes(resumed, tmp_path):
    resumed().load_state_dict(copy.deepcopy(OLD_STATE))
    checkpoint = tmp_path / 'old.pt'
    torch.save({'state': {'algorithms': [('LoRAInject', copy.deepcopy(OLD_STATE))]}}, checkpoint)
    check_resume_compatibility(checkpoint, [resumed()])  # what thaw run checks before building anything


def test_a_checkpoint_written_before_is_still_refused_for_a_changed_field():
    algorithm = LoRAInject(
        r=4, target_modules=['v_proj', 'q_proj'], exclude_modules=['lm_head'], rank_pattern={'q_proj': 2}
    )
    with pytest.raises(ResumeConfigError, match=r"lora_inject.rank_pattern = \{'q_proj': 2\}: .* rank_pattern = \{\}"):
        algorithm.load_state_dict(copy.deepcopy(OLD_STATE))


def test_the_rank_by_position_still_works_with_a_deprecation_warning():
    """``LoRAInject(8)`` worked before the config object; it builds the same algorithm, with notice."""
    with pytest.warns(DeprecationWarning, match=r'write LoRAInject\(r=8\)'):
        positional = LoRAInject(8, target_modules=['q_proj'])
    assert repr(positional) == repr(LoRAInject(r=8, target_modules=['q_proj']))
    with pytest.raises(ValueError, match='given twice: by position'):
        LoRAInject(8, r=4)
