"""Resuming refuses a configuration that differs from the checkpoint's in a field that shaped the saved state, for
every algorithm, naming the field, the checkpoint's value and the new one: from Python when the state loads, from
``thaw run`` before anything is built (exit 2, one line), and, for LoRA's rank, before Composer loads the weights
(no torch size mismatch). Fields that shape nothing saved may change; ``load_weights_only`` reads no algorithm state.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support import REPO, cpu_trainer, seeded_tiny_decoder, set_args

from composer_thaw import HiFTRotation, LayerFreezing, LoRAInject, RegexFreeze
from composer_thaw.cli import EXIT_INVALID, main
from composer_thaw.core.resume_checks import RESUME_CONFIG_KEY, ResumeConfigError


def _half_at_half(elapsed: float, freeze_start: float, freeze_level: float) -> float:
    return 0.5 if elapsed >= 0.5 else 0.0


# (algorithm class, options it was trained with, options it resumes with, the field named first, checkpoint value)
CHANGES: dict[str, tuple[type, dict[str, Any], dict[str, Any], str, Any]] = {
    'HiFT group_size': (HiFTRotation, {'group_size': 2}, {'group_size': 1}, 'group_size', 2),
    'HiFT strategy': (HiFTRotation, {}, {'strategy': 'up2down'}, 'strategy', 'down2up'),
    'HiFT steps_per_group': (HiFTRotation, {}, {'steps_per_group': 3}, 'steps_per_group', 1),
    'HiFT freeze': (HiFTRotation, {'freeze': [0]}, {'freeze': [0, 1]}, 'freeze', [0]),
    'HiFT always_trainable': (HiFTRotation, {}, {'always_trainable': ['lm_head']}, 'always_trainable', None),
    'HiFT units (groups)': (HiFTRotation, {'groups': ['embed', 'layers']}, {}, 'groups', ['embed', 'layers']),
    'HiFT lora': (HiFTRotation, {'lora': True}, {}, 'lora', True),
    'LoRA r': (LoRAInject, {'r': 8}, {'r': 16}, 'r', 8),
    'LoRA lora_alpha': (LoRAInject, {}, {'lora_alpha': 32}, 'lora_alpha', 8),
    'LoRA target_modules': (
        LoRAInject,
        {'target_modules': ['q_proj']},
        {'target_modules': ['v_proj']},
        'target_modules',
        ['q_proj'],
    ),
    'LoRA exclude_modules': (LoRAInject, {}, {'exclude_modules': ['lm_head']}, 'exclude_modules', None),
    'LoRA layers_to_transform': (LoRAInject, {'layers_to_transform': [0]}, {}, 'layers_to_transform', [0]),
    'LoRA rank_pattern': (
        LoRAInject,
        {'rank_pattern': {'q_proj': 4}},
        {'rank_pattern': {'q_proj': 2}},
        'rank_pattern',
        {'q_proj': 4},
    ),
    'LoRA alpha_pattern': (LoRAInject, {}, {'alpha_pattern': {'v_proj': 2.0}}, 'alpha_pattern', {}),
    'LoRA use_rslora': (LoRAInject, {}, {'use_rslora': True}, 'use_rslora', False),
    'LoRA use_dora': (LoRAInject, {'use_dora': True}, {}, 'use_dora', True),
    'LoRA init': (LoRAInject, {'init': 'pissa'}, {}, 'init', 'pissa'),
    'LoRA bias': (LoRAInject, {}, {'bias': 'all'}, 'bias', 'none'),
    'LoRA modules_to_save': (LoRAInject, {}, {'modules_to_save': ['lm_head']}, 'modules_to_save', None),
    'RegexFreeze trainable': (
        RegexFreeze,
        {'trainable': ['lm_head']},
        {'trainable': ['model.norm']},
        'trainable',
        ['lm_head'],
    ),
    'RegexFreeze frozen': (
        RegexFreeze,
        {'frozen': ['lm_head']},
        {'frozen': ['lm_head', 'model.norm']},
        'frozen',
        ['lm_head'],
    ),
    'RegexFreeze syntax': (
        RegexFreeze,
        {'trainable': ['lm_head']},
        {'trainable': ['lm_head'], 'syntax': 'regex'},
        'syntax',
        'axolotl',
    ),
    'LayerFreezing granularity': (LayerFreezing, {}, {'granularity': 'block'}, 'granularity', 'leaf'),
    'LayerFreezing freeze_start': (LayerFreezing, {}, {'freeze_start': 0.25}, 'freeze_start', 0.5),
    'LayerFreezing freeze_level': (LayerFreezing, {'freeze_level': 0.5}, {}, 'freeze_level', 0.5),
    'LayerFreezing interval': (LayerFreezing, {'interval': 2}, {}, 'interval', 2),
    'LayerFreezing schedule': (
        LayerFreezing,
        {'schedule': _half_at_half},
        {},
        'schedule',
        f'{__name__}._half_at_half',
    ),
}
KEYS = {
    HiFTRotation: 'hift_rotation',
    LoRAInject: 'lora_inject',
    RegexFreeze: 'regex_freeze',
    LayerFreezing: 'layer_freezing',
}


@pytest.mark.parametrize('name', list(CHANGES))
def test_a_changed_field_is_refused_naming_it_with_both_values(name):
    cls, trained, resumed, field, saved_value = CHANGES[name]
    state = cls(**trained).state_dict()
    algorithm = cls(**resumed)
    with pytest.raises(ResumeConfigError) as raised:
        algorithm.load_state_dict(state)
    error = raised.value
    assert (error.key, error.value) == (f'algorithms.{KEYS[cls]}.{field}', getattr(algorithm, field))
    assert f'the checkpoint was trained with {field} = {saved_value!r}' in str(error)
    assert 'load_weights_only: true' in str(error)
    cls(**trained).load_state_dict(state)  # the same configuration resumes


@pytest.mark.parametrize(
    'cls, trained, resumed',
    [
        (LoRAInject, {'lora_dropout': 0.1, 'save_adapter_to': 'a'}, {'save_merged_to': 'm'}),
        (HiFTRotation, {'offload': False}, {'lr_per_pass': True}),
    ],
    ids=['LoRA dropout and exports', 'HiFT offload and lr_per_pass'],
)
def test_fields_that_shape_no_saved_state_may_change(cls, trained, resumed):
    cls(**resumed).load_state_dict(cls(**trained).state_dict())


def test_every_changed_field_is_listed_and_state_saved_before_the_record_is_checked_by_its_repr():
    state = HiFTRotation(group_size=2, strategy='up2down').state_dict()
    with pytest.raises(ResumeConfigError, match=r"group_size = 2, strategy = 'up2down' \(now 'down2up'\);"):
        HiFTRotation(group_size=1).load_state_dict(state)
    del state[RESUME_CONFIG_KEY]  # written before the configuration was recorded: its repr tells it
    with pytest.raises(ResumeConfigError, match='group_size = 2'):
        HiFTRotation(group_size=1).load_state_dict(state)


DEMO = REPO / 'yamls/demo.yaml'
TINY = [
    'model.name=tiny-decoder',
    'data.name=python-topics',
    'data.max_seq_len=32',
    'global_train_batch_size=4',
    'data.max_train_samples=8',
    'data.max_eval_samples=4',
    'progress_bar=false',
    'max_duration=2ba',
]


def _checkpoint_of(path, algorithm) -> None:
    """What ``thaw run`` reads of a checkpoint before building anything: its recorded algorithm state."""
    torch.save({'state': {'algorithms': [(type(algorithm).__name__, algorithm.state_dict())], 'model': {}}}, path)


def _thaw_run(overrides: list[str]) -> int:
    return main(['run', str(DEMO), *set_args(overrides)])


@pytest.mark.parametrize(
    'name', ['LoRA r', 'HiFT strategy', 'RegexFreeze trainable', 'LayerFreezing granularity'], ids=str
)
@pytest.mark.parametrize('how', ['load_path', 'autoresume'])
def test_thaw_run_refuses_before_building_anything(name, how, tmp_path, capsys):
    cls, trained, resumed, field, saved_value = CHANGES[name]
    runs = tmp_path / 'runs'
    runs.mkdir()
    checkpoint = runs / 'ep0-ba2-rank0.pt'
    _checkpoint_of(checkpoint, cls(**trained))
    if how == 'load_path':
        resuming = [f'load_path={checkpoint}']
    else:
        (runs / 'latest-rank0.pt').symlink_to(checkpoint.name)
        resuming = [f'save_folder={runs}', 'run_name=r', 'autoresume=true']
    before = sorted(tmp_path.rglob('*'))
    options = '{' + ', '.join(f'{key}: {value!r}' for key, value in resumed.items()) + '}'
    code = _thaw_run([*TINY, f'algorithms={{{KEYS[cls]}: {options}}}', *resuming])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INVALID and len(lines) == 1, lines
    new_value = getattr(cls(**resumed), field)
    assert lines[0].startswith(f'thaw run: invalid recipe: algorithms.{KEYS[cls]}.{field} = {new_value!r}: ')
    assert f"the checkpoint '{checkpoint}' was trained with {field} = {saved_value!r}" in lines[0]
    assert sorted(tmp_path.rglob('*')) == before


def test_thaw_run_with_load_weights_only_compares_nothing(tmp_path):
    from composer_thaw.recipes.schema import load_recipe

    checkpoint = tmp_path / 'ep0-ba2-rank0.pt'
    _checkpoint_of(checkpoint, HiFTRotation(group_size=2))
    recipe = ['algorithms={hift_rotation: {group_size: 1}}', f'load_path={checkpoint}', 'load_weights_only=true']
    load_recipe(DEMO, [*TINY, *recipe])  # validates, reading no algorithm state


@pytest.fixture(scope='module')
def lora_checkpoint(tmp_path_factory):
    """A Trainer checkpoint of a LoRA run with r=4 on the attention projections."""
    folder = tmp_path_factory.mktemp('lora')
    options = dict(r=4, target_modules=['q_proj', 'v_proj'])
    cpu_trainer(
        seeded_tiny_decoder(num_layers=1),
        [LoRAInject(**options)],
        max_duration='1ba',
        save_folder=str(folder),
        save_interval='1ba',
    ).fit()
    return folder / 'ep0-ba1-rank0.pt', options


@pytest.mark.parametrize('weights_only', [False, True], ids=['resume', 'load_weights_only'])
@pytest.mark.parametrize(
    'change, field, value',
    [({'r': 8}, 'r', 8), ({'rank_pattern': {'v_proj': 2}}, 'rank_pattern', {'v_proj': 2})],
    ids=['r', 'rank_pattern'],
)
def test_a_trainer_refuses_adapters_of_another_rank_before_loading_weights(
    lora_checkpoint, change, field, value, weights_only
):
    checkpoint, options = lora_checkpoint
    model = seeded_tiny_decoder(num_layers=1)
    with pytest.raises(ResumeConfigError) as raised:
        cpu_trainer(
            model,
            [LoRAInject(**{**options, **change})],
            load_path=str(checkpoint),
            load_weights_only=weights_only,
        )
    assert (raised.value.key, raised.value.value) == (f'algorithms.lora_inject.{field}', value)
    # named by the adapter layer's own check, or (trainable-only checkpoints record the configuration) by field
    message = str(raised.value)
    assert ('has rank 4' in message or f'trained with {field} = ' in message) and 'size mismatch' not in message


def test_a_trainer_refuses_other_targets_by_name(lora_checkpoint):
    checkpoint, options = lora_checkpoint
    with pytest.raises(ResumeConfigError, match=r"target_modules = \['q_proj'\]: the checkpoint was trained with"):
        cpu_trainer(
            seeded_tiny_decoder(num_layers=1),
            [LoRAInject(**{**options, 'target_modules': ['q_proj']})],
            load_path=str(checkpoint),
        )
