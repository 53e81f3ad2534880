"""The memory estimator: exact against a real run's tensors, close to the process's real memory growth, usable from
the CLI for any model size."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import support
import torch

from composer_thaw.core.validation import ConfigError
from composer_thaw.recipes.memory_estimate import estimate_training_state, load_model_config, spec_of
from composer_thaw.utils.optimizer_surgery import training_state_bytes
from composer_thaw.utils.parameter_selection import user_module

sys.path.insert(0, str(support.REPO))  # the benchmarks package lives at the repository root

HAS_HIFT = importlib.util.find_spec('composer_thaw.hift_rotation') is not None

CASES = [
    ('full', {}),
    ('lora_inject', {'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj', 'v_proj']}),
    ('regex_freeze', {'trainable': ['lm_head', 'model.layers.3', 'model.embed_tokens.weight[0:100]']}),
    ('layer_freezing', {'freeze_start': 0.0, 'freeze_level': 0.5, 'granularity': 'block'}),
]


def _apply(model, optimizer, algorithm, options):
    if algorithm == 'lora_inject':
        from composer_thaw.lora_inject import apply_lora

        apply_lora(model, optimizer, **options)
    elif algorithm == 'regex_freeze':
        from composer_thaw.regex_freeze import apply_regex_freeze

        apply_regex_freeze(model, optimizer, **options)
    elif algorithm == 'layer_freezing':
        from composer_thaw.layer_freezing import freeze_layers

        freeze_layers(model, optimizer, 1.0, **options)


@pytest.mark.parametrize('algorithm,options', CASES, ids=[c[0] for c in CASES])
def test_prediction_equals_the_bytes_after_a_real_step(algorithm, options):
    model = user_module(support.seeded_tiny_decoder())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _apply(model, optimizer, algorithm, options)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    measured = training_state_bytes(model, optimizer)
    predicted = estimate_training_state(spec_of(model), algorithm, options)

    assert (predicted.param_bytes, predicted.grad_bytes, predicted.optimizer_state_bytes) == (
        measured.params,
        measured.grads,
        measured.optimizer_state,
    )
    assert predicted.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_prediction_matches_process_memory_growth_on_a_32m_parameter_decoder():
    """Independent of the estimator's tensor count: RSS growth of the first backward and the first optimizer step."""
    from benchmarks import estimator_check

    # full in fp32, and a selection in bf16 with fp32 masters (master_weights='fp32', issue #13)
    cases = [estimator_check.CASES[0], next(c for c in estimator_check.CASES if c[1].get('master_weights'))]
    checks = estimator_check.run_checks(hidden=384, layers=6, cases=cases)

    for check in checks:
        assert check.params > 30e6
        assert check.within_tolerance, estimator_check.markdown(checks, 384, 6)


@pytest.mark.skipif(not HAS_HIFT, reason='composer_thaw.hift_rotation is not in this checkout')
def test_hift_rotation_keeps_only_the_largest_group_resident():
    spec = load_model_config('tiny-decoder')
    full = estimate_training_state(spec, 'full')
    rotation = estimate_training_state(spec, 'hift_rotation', {'group_size': 1})

    assert rotation.param_bytes == full.param_bytes
    assert rotation.grad_bytes < full.grad_bytes
    assert rotation.optimizer_state_bytes + rotation.offloaded_state_bytes == full.optimizer_state_bytes


def test_7b_sizes_come_from_the_config_without_memory():
    spec = load_model_config('llama-7b')
    full = estimate_training_state(spec, 'full')
    lora = estimate_training_state(spec, 'lora_inject', {'r': 16, 'target_modules': ['q_proj', 'v_proj']})

    assert full.total_params == 6_738_415_616
    assert full.training_state_bytes == 16 * full.total_params + 4 * (2 + 9 * 32 + 1)  # + one Adam step per tensor
    assert lora.trainable_params == 32 * 2 * 16 * (4096 + 4096)
    assert lora.training_state_bytes < 0.26 * full.training_state_bytes


def test_a_local_config_json_with_overrides(tmp_path):
    path = tmp_path / 'config.json'
    path.write_text(json.dumps({'model_type': 'gpt2', 'n_embd': 64, 'n_layer': 2, 'n_head': 2, 'vocab_size': 1000}))

    spec = load_model_config(tmp_path, overrides={'n_layer': 3})

    assert spec.task == 'causal-lm' and spec.config.n_layer == 3
    assert (
        estimate_training_state(spec, 'full', optimizer='sgd').optimizer_state_bytes
        == estimate_training_state(spec, 'full').grad_bytes
    )


@pytest.mark.parametrize(
    'source,fragment',
    [
        ('no-such-model', "'minilm', 'tiny-decoder'"),
        ({'hidden_size': 8}, "no 'model_type'"),
    ],
)
def test_unknown_model_configs_name_what_is_valid(source, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_model_config(source)


@pytest.mark.parametrize(
    'algorithm,options,fragment',
    [
        ('no_such', {}, 'choose one of full'),
        ('lora_inject', {'r': 0}, 'r=0'),
        ('lora_inject', {'rank': 8}, 'rank'),
        ('regex_freeze', {'trainable': ['lm_haed']}, 'lm_haed'),
        ('full', {'r': 1}, 'takes no options'),
    ],
)
def test_bad_algorithms_or_options_raise_config_error(algorithm, options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        estimate_training_state('tiny-decoder', algorithm, options)


def test_cli_prints_one_row_per_algorithm(capsys):
    from composer_thaw.cli import main

    code = main(
        [
            'estimate',
            '--model-config',
            'tiny-decoder',
            '--set',
            'num_hidden_layers=2',
            '--algorithm',
            'full',
            '--algorithm',
            'lora_inject={r: 8, target_modules: [q_proj, v_proj]}',
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert '| full | 3,' in out and "| lora_inject(r=8, target_modules=['q_proj', 'v_proj']) |" in out


@pytest.mark.parametrize(
    'args',
    [
        ['--model-config', 'llama-7b', '--algorithm', 'lora_inject={r: -1}'],
        ['--model-config', 'llama-7b', '--algorithm', 'lora_inject=[1, 2]'],
        ['--model-config', 'nowhere/config.json'],
        ['--model-config', 'gpt2', '--dtype', 'float8'],
    ],
)
def test_cli_invalid_input_exits_2_with_one_line(args, capsys):
    from composer_thaw.cli import main

    assert main(['estimate', *args]) == 2
    assert capsys.readouterr().err.count('\n') == 1


@pytest.mark.parametrize('algorithm,options', CASES, ids=[c[0] for c in CASES])
def test_master_weights_prediction_equals_the_bytes_of_a_real_step(algorithm, options):
    from composer_thaw.utils.master_weights import enable_master_weights

    model = user_module(support.seeded_tiny_decoder()).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _apply(model, optimizer, algorithm, options)
    masters = enable_master_weights(model, optimizer, 'fp32')
    assert masters is not None
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grads = training_state_bytes(model, optimizer)
    optimizer.step()
    measured = training_state_bytes(model, optimizer)

    predicted = estimate_training_state(spec_of(model), algorithm, {**options, 'master_weights': 'fp32'})

    assert predicted.param_bytes == measured.params
    assert predicted.grad_bytes == with_grads.grads
    assert predicted.optimizer_state_bytes == measured.optimizer_state
    assert predicted.master_bytes == masters.master_bytes()
    assert predicted.step_grad_bytes == masters.master_bytes() // 2


def test_llama_3_8b_full_fine_tune_by_hift_with_master_weights_fits_in_20_gib():
    """Issue #13's acceptance: bf16 weights, HiFT group_size 1 over the decoder blocks (embeddings, final norm and
    head frozen, as BAdam trains), fp32 masters and AdamW state for the active block only."""
    spec = load_model_config('llama-3-8b')
    blocks_only = estimate_training_state(
        spec, 'hift_rotation', {'group_size': 1, 'freeze': [0, 33, 34], 'master_weights': 'fp32'}
    )
    assert blocks_only.total_params == 8_030_261_248
    assert blocks_only.trainable_params == 218_112_000  # one decoder block
    assert blocks_only.training_state_bytes <= 20 * 2**30
    # one block's fp32 state and masters out, the next one's in; the other 31 blocks' wait on the host
    assert blocks_only.transfer_bytes_per_step == 2 * (blocks_only.optimizer_state_bytes + blocks_only.master_bytes)
    assert blocks_only.offloaded_state_bytes == 31 * (blocks_only.optimizer_state_bytes + blocks_only.master_bytes)
    everything = estimate_training_state(spec, 'hift_rotation', {'group_size': 1, 'master_weights': 'fp32'})
    assert everything.trainable_params == 525_336_576  # the embedding unit sets the peak
    assert everything.training_state_bytes > blocks_only.training_state_bytes


@pytest.mark.parametrize('algorithm,options', [('full', {'master_weights': 'bf16'}), ('full', {'lr': 1})])
def test_full_takes_only_a_valid_master_weights_option(algorithm, options):
    with pytest.raises(ConfigError, match='master_weights'):
        estimate_training_state('tiny-decoder', algorithm, options)


@pytest.mark.parametrize('offload', [True, False])
def test_hift_master_weights_prediction_equals_a_rotation_that_visited_every_group(offload):
    """Issue #22: HiFT keeps every group's master. On the device: the active group's masters (every group's without
    offload); on the host: the others' fp32 optimizer state and masters; per step: one group's out and the next one's
    in (down2up, group_size 1: every unit of the tiny decoder has the same size but the embeddings and the head)."""
    from composer_thaw.hift_rotation import GroupRotation
    from composer_thaw.utils.master_weights import master_weights_of

    model = user_module(support.seeded_tiny_decoder()).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {'group_size': 1, 'freeze': [0, 6], 'offload': offload}  # the blocks and the final norm rotate
    rotation = GroupRotation(model, optimizer, master_weights='fp32', **options)
    for _ in range(5):  # four blocks and the norm: the last group active, every other one visited once
        rotation.before_step()
        ids = torch.randint(0, 1000, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    masters = master_weights_of(optimizer)
    assert masters is not None and rotation.active == (5,)  # the norm: the smallest group, not the estimate's peak

    predicted = estimate_training_state(spec_of(model), 'hift_rotation', {**options, 'master_weights': 'fp32'})

    block = list(model.model.layers[3].parameters())
    norm = list(model.model.norm.parameters())
    rotating = [p for layer in model.model.layers for p in layer.parameters()] + norm
    assert predicted.master_bytes == 4 * sum(p.numel() for p in (block if offload else rotating))
    assert masters.master_bytes() == 4 * sum(p.numel() for p in (norm if offload else rotating))
    if offload:
        # the host holds what the rotation offloaded; the estimate's peak has a block active instead of the norm
        held = rotation.offloaded_bytes() + masters.offloaded_bytes()

        def moving(params) -> int:  # fp32 exp_avg, exp_avg_sq and master per element, a 4-byte step per tensor
            return sum(12 * p.numel() + 4 for p in params)

        assert predicted.offloaded_state_bytes == held + moving(norm) - moving(block)
        # each switch moves a group's state and masters out and the next one's in: over a pass of 4 blocks and the norm
        assert predicted.transfer_bytes_per_step == 2 * (4 * moving(block) + moving(norm)) // 5
    else:
        assert predicted.offloaded_state_bytes == 0 and masters.offloaded_bytes() == 0


def test_each_algorithm_states_its_own_estimate_and_the_estimator_names_none():
    """Issue #23: ``thaw estimate`` finds ``estimate_memory`` next to each algorithm's class (as the conformance suite
    finds ``EXAMPLES``), so the estimator has no branch per algorithm and restates none of their defaults."""
    import ast
    import inspect

    from composer_thaw.core.registry import algorithm_module
    from composer_thaw.recipes import memory_estimate
    from composer_thaw.recipes.memory_estimate import estimated_algorithms

    ours = ('hift_rotation', 'layer_freezing', 'lora_inject', 'regex_freeze')
    assert set(ours) <= set(estimated_algorithms()) and estimated_algorithms()[0] == 'full'
    for name in ours:
        assert callable(getattr(algorithm_module(name), 'estimate_memory', None)), name
    tree = ast.parse(inspect.getsource(memory_estimate))
    compared = [  # `algorithm == 'lora_inject'` and the like: a branch per algorithm
        node.value
        for compare in ast.walk(tree)
        if isinstance(compare, ast.Compare)
        for node in ast.walk(compare)
        if isinstance(node, ast.Constant) and node.value in ours
    ]
    assert not compared, f'the estimator branches on {compared}'
    with pytest.raises(ConfigError, match='not estimated; choose one of full, '):
        estimate_training_state(load_model_config('tiny-decoder'), 'gradient_clipping')
