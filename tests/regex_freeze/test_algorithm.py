"""The RegexFreeze algorithm: configuration, events, logging, idempotence, recipes."""

from __future__ import annotations

import pytest
import support
import torch
from composer.core import Event
from composer.loggers import InMemoryLogger

from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.state import STATE_VERSION_KEY
from composer_thaw.regex_freeze import RegexFreeze, apply_regex_freeze, freeze_preview
from composer_thaw.regex_freeze.regex_freeze import EXAMPLES
from composer_thaw.utils.parameter_selection import user_module

from .reference import full_parameters


def test_repr_evals_back_and_compares_by_configuration():
    algorithm = RegexFreeze(
        trainable=['lm_head', 'model.embed_tokens.weight[0:100]'], frozen=['lm_head.weight[0:5]'], syntax='regex'
    )
    rebuilt = eval(repr(algorithm))
    assert rebuilt == algorithm
    assert repr(RegexFreeze(frozen=['lm_head'])) == "RegexFreeze(frozen=['lm_head'])"


def test_built_from_recipe_data_by_name():
    algorithm = build_algorithm(
        'regex_freeze', {'trainable': ['lm_head'], 'frozen': ['lm_head.weight[0:10]'], 'syntax': 'regex'}
    )
    assert algorithm == RegexFreeze(trainable=['lm_head'], frozen=['lm_head.weight[0:10]'], syntax='regex')


@pytest.mark.parametrize('example', EXAMPLES, ids=[repr(e) for e in EXAMPLES])
def test_examples_are_valid_on_the_tiny_decoder(example):
    model = support.seeded_tiny_decoder(hidden_size=64, num_layers=4)
    optimizer = torch.optim.AdamW(model.parameters())
    selection = apply_regex_freeze(model, optimizer, **example)
    assert 0 < selection.trainable_params < selection.total_params


def test_runs_at_init_and_after_load_and_logs_counts():
    model = support.seeded_tiny_decoder()
    algorithm = RegexFreeze(trainable=['lm_head', 'model.layers.3'])
    assert not algorithm.match(Event.BATCH_END, None)  # nothing to keep in sync before it has run
    logger = InMemoryLogger()
    trainer = support.cpu_trainer(model, [algorithm], loggers=[logger], max_duration='1ba')
    assert algorithm.match(Event.INIT, trainer.state) and algorithm.match(Event.AFTER_LOAD, trainer.state)
    assert not algorithm.match(Event.BATCH_END, trainer.state)  # no EMA to keep in sync: nothing to do in training
    params = dict(user_module(model).named_parameters())
    expected = sum(p.numel() for n, p in params.items() if n.startswith(('lm_head.', 'model.layers.3.')))
    total = sum(p.numel() for p in params.values())
    assert logger.data['regex_freeze/trainable_params'][-1][1] == expected
    assert logger.data['regex_freeze/total_params'][-1][1] == total
    assert logger.data['regex_freeze/trainable_fraction'][-1][1] == pytest.approx(expected / total)
    # Frozen before the first step: the optimizer holds only trainable tensors.
    assert {id(p) for g in trainer.state.optimizers[0].param_groups for p in g['params']} == {
        id(p) for n, p in params.items() if n.startswith(('lm_head.', 'model.layers.3.'))
    }


def test_frozen_list_alone_trains_everything_else():
    model = support.seeded_tiny_decoder()
    selection = apply_regex_freeze(
        model, torch.optim.AdamW(model.parameters()), frozen=['model.embed_tokens', 'lm_head']
    )
    frozen = {name for name, t in selection.items() if not t.trainable_rows}
    assert frozen == {'model.embed_tokens.weight', 'lm_head.weight'}
    assert all(t.fully_trainable for name, t in selection.items() if name not in frozen)


def test_frozen_rows_are_taken_out_of_trainable_rows():
    model = support.seeded_tiny_decoder()
    selection = apply_regex_freeze(
        model,
        torch.optim.AdamW(model.parameters()),
        trainable=['model.embed_tokens.weight[0:100]', 'model.embed_tokens.weight[200:300]'],
        frozen=['model.embed_tokens.weight[50:250]', 'model.embed_tokens.weight[290]'],
    )
    assert selection['model.embed_tokens.weight'].trainable_rows == ((0, 50), (250, 290), (291, 300))


def _apply_and_step(model, optimizer, times, **patterns):
    for _ in range(times):
        apply_regex_freeze(model, optimizer, **patterns)
    batch = next(iter(support.lm_loader()))
    model.loss(model(batch), batch).backward()
    optimizer.step()


def test_applying_twice_is_the_same_as_once():
    patterns = dict(trainable=['model.embed_tokens.weight[1000:3000]', 'model.layers.2'])
    results = []
    for times in (1, 2):
        model = support.seeded_tiny_decoder()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _apply_and_step(model, optimizer, times, **patterns)
        assert len(optimizer._optimizer_step_pre_hooks) == len(optimizer._optimizer_step_post_hooks) == 1
        results.append((full_parameters(model), [[id(p) for p in g['params']] for g in optimizer.param_groups]))
    (once, _), (twice, _) = results
    assert all(torch.equal(once[name], twice[name]) for name in once)


def test_applying_new_patterns_returns_tensors_to_their_original_param_group():
    model = support.seeded_tiny_decoder()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {'params': [p for p in params if p.ndim >= 2]},
            {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0},
        ]
    )
    original = [[id(p) for p in g['params']] for g in optimizer.param_groups]
    apply_regex_freeze(model, optimizer, trainable=['lm_head.weight[0:10]'])
    assert [len(g['params']) for g in optimizer.param_groups] == [1, 0]
    apply_regex_freeze(model, optimizer, frozen=['lm_head'])
    after = [[id(p) for p in g['params']] for g in optimizer.param_groups]
    lm_head = id(user_module(model).lm_head.weight)
    assert after == [[i for i in original[0] if i != lm_head], original[1]]
    assert len(optimizer._optimizer_step_pre_hooks) == 0  # no rows to guard any more


def test_state_dict_is_versioned_and_records_the_selection():
    model = support.seeded_tiny_decoder()
    algorithm = RegexFreeze(trainable=['lm_head.weight[0:10]'])
    support.cpu_trainer(model, [algorithm], max_duration='1ba')
    state = algorithm.state_dict()
    assert state[STATE_VERSION_KEY] == 1
    assert state['trainable_rows'] == {'lm_head.weight': [[0, 10]]}
    with pytest.raises(ValueError, match='version 99'):
        algorithm.load_state_dict({**state, STATE_VERSION_KEY: 99})
    algorithm.load_state_dict(state)  # re-applies, idempotently: still one pair of step hooks guarding the rows
    assert len(algorithm._optimizers[0]._optimizer_step_pre_hooks) == 1


def test_from_a_yaml_recipe(tmp_path):
    from composer_thaw.recipes.running import build_trainer
    from composer_thaw.recipes.schema import recipe_from_mapping

    recipe = recipe_from_mapping(
        {
            'model': {'name': 'tiny-decoder', 'hidden_size': 32, 'num_layers': 2},
            'data': {'name': 'python-topics', 'max_seq_len': 32, 'max_train_samples': 16, 'max_eval_samples': 4},
            'optimizer': {'name': 'adamw', 'lr': 1e-2, 'weight_decay': 0.1},
            'algorithms': {
                'regex_freeze': {'trainable': ['model.embed_tokens.weight[1000:3000]', 'model.layers.1', 'model.norm']}
            },
            'max_duration': '3ba',
            'global_train_batch_size': 4,
            'eval_interval': '3ba',
            'progress_bar': False,
            'device': 'cpu',
        }
    )
    trainer, _, _ = build_trainer(recipe)
    model = trainer.state.model
    initial = full_parameters(model)
    trainer.fit()
    final = full_parameters(model)
    for name, value in initial.items():
        if name.startswith(('model.layers.1.', 'model.norm.')):
            assert not torch.equal(final[name], value), name
        elif name == 'model.embed_tokens.weight':
            assert torch.equal(final[name][3000:], value[3000:]) and torch.equal(final[name][:1000], value[:1000])
            assert not torch.equal(final[name][1000:3000], value[1000:3000])
        else:
            assert torch.equal(final[name], value), name


def test_preview_table():
    model = support.seeded_tiny_decoder(num_layers=2)
    table = freeze_preview(
        model,
        trainable=['lm_head', 'model.embed_tokens.weight[0:10]', 'model.layers.1.mlp'],
        frozen=['lm_head.weight[5:]'],
    )
    lines = table.splitlines()
    assert lines[0].split() == ['module', 'trainable', 'total', 'rows']
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows['model.embed_tokens'].split()[1:] == ['320', '976,704', 'weight:', 'rows', '0:10', 'of', '30522']
    assert rows['lm_head'].split()[1:3] == ['160', '976,704']
    assert rows['model.layers.1.mlp.up_proj'].split()[1:] == ['2,048', '2,048', 'all']
    assert rows['model.layers.0.self_attn.q_proj'].split()[1:] == ['0', '1,024', 'frozen']
    assert lines[-1].split()[:3] == ['total', '6,624', '1,974,048']
    assert 'trainable' in lines[-1]
    assert all(p.requires_grad for p in model.parameters()), 'the preview changes nothing'


def test_tied_weights_are_matched_under_each_name():
    model = support.seeded_tiny_decoder(num_layers=2, tie_word_embeddings=True)
    optimizer = torch.optim.AdamW(model.parameters())
    selection = apply_regex_freeze(model, optimizer, trainable=['lm_head.weight[0:10]'])
    assert 'lm_head.weight' not in selection  # reported under its first name
    assert selection['model.embed_tokens.weight'].trainable_rows == ((0, 10),)
    assert user_module(model).lm_head.weight.requires_grad
