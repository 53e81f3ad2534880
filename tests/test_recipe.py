"""Recipes are validated whole before any model is built, and round-trip through plain data."""

import textwrap
from pathlib import Path

import pytest
import torch
from support import REPO, run_thaw

from composer_thaw.cli import EXIT_INVALID, main
from composer_thaw.core.validation import ConfigError
from composer_thaw.recipes.schema import Recipe, load_recipe, recipe_from_mapping, recipe_to_mapping

RECIPES = sorted((REPO / 'yamls').glob('*.yaml'))


@pytest.mark.parametrize('path', RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe_from_mapping(recipe_to_mapping(recipe)) == recipe


def test_overrides_reach_nested_keys_and_parse_values_as_yaml():
    recipe = load_recipe(REPO / 'yamls/demo.yaml', ['optimizer.lr=3e-4', 'max_duration=5ba', 'data.max_seq_len=32'])
    assert recipe.optimizer.lr == 3e-4
    assert recipe.max_duration == '5ba'
    assert recipe.data.max_seq_len == 32


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'recipe.yaml'
    path.write_text(textwrap.dedent(text))
    return path


BAD_RECIPES = {
    'misspelled algorithm': (
        'algorithms: {gradient_cliping: {}}',
        'algorithms.gradient_cliping',
        "Did you mean 'gradient_clipping'",
    ),
    'missing model path': (
        'model: {name: hf, path: /nowhere/model}',
        'model.path',
        'expected a directory containing config.json',
    ),
    'string for a number': ('optimizer: {lr: fast}', 'optimizer.lr', 'expected a number (float)'),
    'unknown top-level key': ('max_durration: 1ep', 'max_durration', "did you mean 'max_duration'"),
    'bad algorithm option type': (
        'algorithms: {gradient_clipping: {clipping_type: norm, clipping_threshold: high}}',
        'algorithms.gradient_clipping.clipping_threshold',
        'expected a number',
    ),
    'bad duration': ('max_duration: forever', 'max_duration', "Composer time string such as '2ep'"),
    'unknown logger': ('loggers: {slack: {}}', 'loggers.slack', 'valid loggers: console, file'),
    'missing checkpoint': ('load_path: /nowhere/ckpt.pt', 'load_path', 'no checkpoint file there'),
    'model and data mismatch': ('model: {name: tiny-decoder}', 'data.name', "use data.name 'python-topics'"),
    'misspelled FSDP2 option': (
        'parallelism: {fsdp: {state_dict_typ: full}}',
        'parallelism.fsdp.state_dict_typ',
        "did you mean 'state_dict_type'",
    ),
    'unknown checkpoint format': (
        'parallelism: {fsdp: {state_dict_type: local}}',
        'parallelism.fsdp.state_dict_type',
        "one of 'sharded', 'full'",
    ),
}
if not torch.cuda.is_available():
    BAD_RECIPES['gpu without CUDA'] = ('device: gpu', 'device', 'no CUDA device is visible')
    BAD_RECIPES['mixed precision on CPU'] = ('precision: amp_bf16', 'precision', "on CPU use 'fp32'")


@pytest.mark.parametrize('case', BAD_RECIPES, ids=list(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_message_naming_key_and_fix(case, tmp_path, capsys):
    text, key, fragment = BAD_RECIPES[case]
    assert main(['run', str(_write(tmp_path, text))]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith(f'thaw run: invalid recipe: {key} = ')
    assert fragment in err
    assert err.count('\n') == 1 and 'Traceback' not in err


def test_missing_recipe_file_and_bad_override_are_errors(tmp_path, capsys):
    assert main(['run', str(tmp_path / 'absent.yaml')]) == EXIT_INVALID
    assert 'no such file' in capsys.readouterr().err
    assert main(['run', str(REPO / 'yamls/demo.yaml'), '--set', 'optimizer']) == EXIT_INVALID
    assert 'expected path.to.key=value' in capsys.readouterr().err


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    result = run_thaw('run', str(_write(tmp_path, 'algorithms: {lora_injetc: {r: 8}}')))
    assert result.returncode == EXIT_INVALID
    assert 'Traceback' not in result.stderr
    assert 'algorithms.lora_injetc' in result.stderr and 'Known algorithms:' in result.stderr


def test_defaults_are_a_valid_recipe():
    assert recipe_from_mapping({}) == Recipe()
    with pytest.raises(ConfigError):
        recipe_from_mapping({'global_train_batch_size': 0})


def test_freeze_preview_shows_what_a_recipe_would_train(capsys):
    assert main(['freeze-preview', str(REPO / 'yamls/demo.yaml')]) == 0
    table = capsys.readouterr().out
    assert 'bert.encoder.layer.5.output.dense' in table and 'bert.encoder.layer.4.output.dense' in table
    assert 'total' in table and '% trainable' in table


def test_freeze_preview_of_a_pattern_that_matches_nothing_exits_2(capsys):
    assert main(['freeze-preview', 'tiny-decoder', '--pattern', 'lm_haed']) == EXIT_INVALID
    assert "Closest parameter names: 'lm_head.weight'" in capsys.readouterr().err


def test_resuming_without_the_checkpoints_algorithm_is_refused_by_name(tmp_path, capsys):
    from composer_thaw.recipes.running import run_recipe

    decoder = [
        'model.name=tiny-decoder',
        'data.name=python-topics',
        'data.max_seq_len=32',
        'max_duration=2ba',
        'global_train_batch_size=4',
        'data.max_train_samples=16',
        'data.max_eval_samples=4',
        'progress_bar=false',
        'algorithms={regex_freeze: {trainable: [lm_head]}}',
    ]
    run_recipe(load_recipe(REPO / 'yamls/demo.yaml', decoder + [f'save_folder={tmp_path}', 'save_interval=2ba']))
    checkpoint = tmp_path / 'ep0-ba2-rank0.pt'
    resume = [o.replace('algorithms={regex_freeze: {trainable: [lm_head]}}', 'algorithms={}') for o in decoder]
    args = ['run', str(REPO / 'yamls/demo.yaml'), *[f'--set={o}' for o in resume + [f'load_path={checkpoint}']]]
    assert main(args) == EXIT_INVALID
    assert "RegexFreeze(trainable=['lm_head'])" in capsys.readouterr().err
    load_recipe(REPO / 'yamls/demo.yaml', decoder + [f'load_path={checkpoint}'])  # with it: valid


def test_broken_yaml_and_indivisible_batch_are_one_line_errors(tmp_path, capsys):
    assert main(['run', str(_write(tmp_path, 'model: {name: minilm'))]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert 'not valid YAML at line 1, column 21' in err and err.count('\n') == 1
    assert main(['run', str(REPO / 'yamls/demo.yaml'), '--nproc', '2', '--set', 'global_train_batch_size=3']) == 2
    assert 'must be divisible by the number of processes (--nproc 2)' in capsys.readouterr().err


def test_nproc_reruns_the_same_command_in_each_process_of_composers_launcher(monkeypatch):
    """``thaw run --nproc 2`` starts Composer's launcher (composer_thaw.recipes.node_launcher) with 2 processes, each
    running ``thaw run`` with the same recipe and overrides (what each process then does is the ``sharded_recipe``
    part of tests/two_processes.py)."""
    from composer_thaw.recipes import launching

    launched = []
    monkeypatch.setattr(launching, 'run_launcher', lambda command, env, passed: launched.append((command, env)) or 0)
    recipe = str(REPO / 'yamls/sharded_decoder.yaml')
    assert main(['run', recipe, '--nproc', '2', '--set', 'max_duration=2ba']) == 0
    ((command, env),) = launched
    assert command[1:] == [
        '-m', 'composer_thaw.recipes.node_launcher', '-n', '2', '-m', 'composer_thaw.cli', 'run', recipe,
        '--set', 'max_duration=2ba',
    ]  # fmt: skip
    assert env['OMP_NUM_THREADS'] and env['THAW_STOP_REPORTS']


def test_hift_preview_shows_the_recipes_units_and_order(capsys):
    assert main(['hift-preview', str(REPO / 'yamls/hift_minilm.yaml')]) == 0
    table = capsys.readouterr().out
    assert 'always trainable' in table and 'group 7: bert.embeddings' in table  # up2down: embeddings last
    assert main(['hift-preview', 'tiny-decoder', '--group-size', '9']) == EXIT_INVALID
    assert 'use group_size between 1 and 7' in capsys.readouterr().err


def test_a_training_set_smaller_than_one_batch_is_refused_before_the_model_is_built(capsys):
    overrides = ['--set', 'data.max_train_samples=8', '--set', 'progress_bar=false']
    assert main(['run', str(REPO / 'yamls/demo.yaml'), *overrides]) == EXIT_INVALID
    assert 'the training set has only 8 examples' in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(['--version'])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f'thaw (composer-thaw) {version("composer-thaw")}'
