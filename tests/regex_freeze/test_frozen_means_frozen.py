"""Under Composer's Trainer with AdamW (weight decay 0.1), frozen elements never change and trainable elements
train exactly as if they alone had been made trainable by hand."""

from __future__ import annotations

import pytest
import support
import torch

from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.optimizer_surgery import training_state_bytes
from composer_thaw.utils.parameter_selection import user_module

from .reference import full_parameters, make_trainable_by_hand

TRAINABLE = [
    'lm_head.weight[1000:3000]',
    'lm_head.weight[2990:3100]',  # overlapping ranges merge to 1000:3100
    'model.embed_tokens.weight[1000:3000]',
    'model.layers.3',
    'model.layers.1.mlp.up_proj.weight[3:7]',
    'model.norm',
]
FROZEN = ['model.layers.3.self_attn.q_proj', 'model.layers.3.mlp.down_proj.weight[0:8]']

BY_HAND = {
    'lm_head.weight': ((1000, 3100),),
    'model.embed_tokens.weight': ((1000, 3000),),
    'model.layers.1.mlp.up_proj.weight': ((3, 7),),
    'model.norm.weight': ((0, 32),),
    'model.layers.3.self_attn.k_proj.weight': ((0, 32),),
    'model.layers.3.self_attn.v_proj.weight': ((0, 32),),
    'model.layers.3.self_attn.o_proj.weight': ((0, 32),),
    'model.layers.3.mlp.gate_proj.weight': ((0, 64),),
    'model.layers.3.mlp.up_proj.weight': ((0, 64),),
    'model.layers.3.mlp.down_proj.weight': ((8, 32),),
    'model.layers.3.input_layernorm.weight': ((0, 32),),
    'model.layers.3.post_attention_layernorm.weight': ((0, 32),),
}
STEPS = '20ba'


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)


@pytest.fixture(scope='module')
def runs():
    model = support.seeded_tiny_decoder()
    initial = full_parameters(model)
    algorithm = RegexFreeze(trainable=TRAINABLE, frozen=FROZEN)
    trainer = support.cpu_trainer(model, [algorithm], optimizer=_adamw(model.parameters()), max_duration=STEPS)
    trainer.fit()
    frozen_run = dict(
        model=model,
        trainer=trainer,
        algorithm=algorithm,
        final=full_parameters(model),
        bytes=training_state_bytes(model, trainer.state.optimizers),
    )

    reference_model = support.seeded_tiny_decoder()
    leaves = make_trainable_by_hand(reference_model, BY_HAND)
    reference = support.cpu_trainer(reference_model, optimizer=_adamw(leaves), max_duration=STEPS)
    reference.fit()

    baseline_model = support.seeded_tiny_decoder()
    baseline = support.cpu_trainer(baseline_model, optimizer=_adamw(baseline_model.parameters()), max_duration='1ba')
    baseline.fit()
    return dict(
        initial=initial,
        frozen=frozen_run,
        reference=full_parameters(reference_model),
        baseline_bytes=training_state_bytes(baseline_model, baseline.state.optimizers),
    )


def _trainable_mask(name, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    for start, end in BY_HAND.get(name, ()):
        mask[start:end] = True
    return mask


def test_selection_is_the_one_written_by_hand(runs):
    selection = runs['frozen']['algorithm'].selection
    assert selection.as_plain_data() == {name: [list(r) for r in rows] for name, rows in BY_HAND.items()}


def test_every_frozen_element_is_bit_identical(runs):
    initial, final = runs['initial'], runs['frozen']['final']
    for name, value in initial.items():
        frozen = ~_trainable_mask(name, value.shape)
        assert torch.equal(final[name][frozen], value[frozen]), f'frozen elements of {name} changed'


def test_trainable_elements_trained(runs):
    initial, final = runs['initial'], runs['frozen']['final']
    for name in BY_HAND:
        trainable = _trainable_mask(name, initial[name].shape)
        assert not torch.equal(final[name][trainable], initial[name][trainable]), f'{name} did not train'


def test_every_element_equals_the_reference_trained_by_hand(runs):
    final, reference = runs['frozen']['final'], runs['reference']
    assert sorted(final) == sorted(reference)
    different = [name for name in final if not torch.equal(final[name], reference[name])]
    assert not different, f'differ from the by-hand reference: {different}'


def test_optimizer_state_only_for_trainable_tensors(runs):
    model, optimizer = runs['frozen']['model'], runs['frozen']['trainer'].state.optimizers[0]
    params = dict(user_module(model).named_parameters())
    trainable = {id(params[name]) for name in BY_HAND}
    assert {id(p) for p in optimizer.state} == trainable
    assert {id(p) for group in optimizer.param_groups for p in group['params']} == trainable
    for name, param in params.items():
        assert param.requires_grad == (name in BY_HAND), name


def test_partially_trainable_tensors_keep_full_size_state(runs):
    optimizer = runs['frozen']['trainer'].state.optimizers[0]
    embedding = user_module(runs['frozen']['model']).model.embed_tokens.weight
    assert optimizer.state[embedding]['exp_avg'].shape == embedding.shape
    frozen_rows = torch.ones(embedding.shape[0], dtype=torch.bool)
    frozen_rows[1000:3000] = False
    assert not optimizer.state[embedding]['exp_avg'][frozen_rows].any()  # zero gradients there, so zero moments


def test_training_state_bytes_shrink(runs):
    params = dict(user_module(runs['frozen']['model']).named_parameters())
    state_bytes = sum(2 * params[name].numel() * 4 + 4 for name in BY_HAND)  # exp_avg, exp_avg_sq, step
    frozen, baseline = runs['frozen']['bytes'], runs['baseline_bytes']
    assert frozen.optimizer_state == state_bytes
    assert baseline.optimizer_state == sum(2 * p.numel() * 4 + 4 for p in params.values())
    # Partially trainable tensors keep full-size state: the two 30522-row embeddings dominate here.
    assert frozen.optimizer_state < baseline.optimizer_state
    print(
        f'\noptimizer state bytes, rows of embeddings trainable: all trainable {baseline.optimizer_state:,}, '
        f'RegexFreeze {frozen.optimizer_state:,} ({frozen.optimizer_state / baseline.optimizer_state:.1%})'
    )


def test_training_state_bytes_shrink_with_whole_tensors():
    from composer_thaw.regex_freeze import apply_regex_freeze

    measured = {}
    for label, patterns in (('all', None), ('layers.3 + norm', ['model.layers.3', 'model.norm'])):
        model = support.seeded_tiny_decoder()
        optimizer = _adamw(model.parameters())
        if patterns is not None:
            apply_regex_freeze(model, optimizer, trainable=patterns)
        batch = next(iter(support.lm_loader()))
        model.loss(model(batch), batch).backward()
        optimizer.step()
        measured[label] = training_state_bytes(model, optimizer)
    params = dict(user_module(model).named_parameters())
    kept = [p for name, p in params.items() if name.startswith(('model.layers.3.', 'model.norm.'))]
    assert measured['layers.3 + norm'].optimizer_state == sum(2 * p.numel() * 4 + 4 for p in kept)
    assert measured['layers.3 + norm'].grads == sum(p.numel() * 4 for p in kept)
    print(
        f'\ntraining state bytes (params + grads + optimizer state): all trainable {measured["all"].total:,}, '
        f'model.layers.3 + model.norm {measured["layers.3 + norm"].total:,}; optimizer state '
        f'{measured["all"].optimizer_state:,} -> {measured["layers.3 + norm"].optimizer_state:,}'
    )


def test_frozen_rows_get_zero_gradient_and_frozen_tensors_none(runs):
    model = support.seeded_tiny_decoder()
    optimizer = _adamw(model.parameters())
    from composer_thaw.regex_freeze import apply_regex_freeze

    apply_regex_freeze(model, optimizer, trainable=TRAINABLE, frozen=FROZEN)
    batch = next(iter(support.lm_loader()))
    model.loss(model(batch), batch).backward()
    for name, param in user_module(model).named_parameters():
        if name not in BY_HAND:
            assert param.grad is None, name
            continue
        trainable = _trainable_mask(name, param.shape)
        assert not param.grad[~trainable].any(), name
    assert user_module(model).lm_head.weight.grad[1000:3100].any()
