"""Frozen rows stay bit-identical with Composer's EMA, gradient clipping and gradient accumulation together;
trainable rows match the by-hand reference."""

from __future__ import annotations

import pytest
import support
import torch
from composer.algorithms import EMA, GradientClipping

from composer_thaw.regex_freeze import RegexFreeze

from .reference import full_parameters, make_trainable_by_hand

TRAINABLE = ['model.embed_tokens.weight[1000:2500]', 'lm_head.weight[1000:2500]', 'model.layers.2', 'model.norm']
FROZEN = ['model.layers.2.mlp.up_proj.weight[0:32]']
BY_HAND = {
    'model.embed_tokens.weight': ((1000, 2500),),
    'lm_head.weight': ((1000, 2500),),
    'model.norm.weight': ((0, 32),),
    **{
        f'model.layers.2.{leaf}.weight': ((0, rows),)
        for leaf, rows in [
            ('self_attn.q_proj', 32),
            ('self_attn.k_proj', 32),
            ('self_attn.v_proj', 32),
            ('self_attn.o_proj', 32),
            ('mlp.gate_proj', 64),
            ('mlp.down_proj', 32),
            ('input_layernorm', 32),
            ('post_attention_layernorm', 32),
        ]
    },
    'model.layers.2.mlp.up_proj.weight': ((32, 64),),
}


def _frozen_mask(name, shape):
    mask = torch.ones(shape, dtype=torch.bool)
    for start, end in BY_HAND.get(name, ()):
        mask[start:end] = False
    return mask


def _run(model, algorithms, params, save_folder):
    trainer = support.cpu_trainer(
        model,
        algorithms,
        optimizer=torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        max_duration='8ba',
        device_train_microbatch_size=2,  # batches of 4: two microbatches accumulate
        eval_dataloader=support.lm_loader(batch_size=8, max_blocks=8, split=1),
        eval_interval='3ba',
        save_folder=str(save_folder),
        save_interval='4ba',
        save_overwrite=True,
    )
    trainer.fit()
    return trainer


def _composer_algorithms():
    return [EMA(half_life='2ba'), GradientClipping(clipping_type='norm', clipping_threshold=0.05)]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    model = support.seeded_tiny_decoder()
    leaves = make_trainable_by_hand(model, BY_HAND)
    _run(model, _composer_algorithms(), leaves, tmp_path_factory.mktemp('reference'))
    return full_parameters(model)


@pytest.mark.parametrize('freeze_first', [True, False], ids=['RegexFreeze-first', 'RegexFreeze-last'])
def test_frozen_rows_bit_identical_and_trainable_rows_match_reference(freeze_first, reference, tmp_path):
    model = support.seeded_tiny_decoder()
    initial = full_parameters(model)
    freeze = RegexFreeze(trainable=TRAINABLE, frozen=FROZEN)
    ema, clipping = _composer_algorithms()
    algorithms = [freeze, ema, clipping] if freeze_first else [ema, clipping, freeze]
    trainer = _run(model, algorithms, model.parameters(), tmp_path)
    assert freeze.selection.as_plain_data() == {name: [list(r) for r in rows] for name, rows in BY_HAND.items()}

    final = full_parameters(model)
    for name, value in initial.items():
        frozen = _frozen_mask(name, value.shape)
        assert torch.equal(final[name][frozen], value[frozen]), f'frozen elements of {name} changed'

    # EMA's own copy (now holding the training weights) keeps the frozen rows exact too.
    store = ema.ema_model.named_parameters_dict
    for name, param in trainer.state.model.named_parameters():
        user_name = name.removeprefix('model.')
        if name in store and user_name in BY_HAND:
            frozen = _frozen_mask(user_name, param.shape)
            assert torch.equal(store[name][frozen], initial[user_name][frozen]), name

    # So does every checkpoint; EMA swaps its averaged weights into the model to write them.
    checkpoints = sorted(tmp_path.glob('ep*-ba*-rank0.pt'))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state']
        assert dict(state['algorithms'])['EMA']['ema_weights_active']
        weights = state['model']
        for name, value in initial.items():
            frozen = _frozen_mask(name, value.shape)
            assert torch.equal(weights[f'model.{name}'][frozen], value[frozen]), f'{checkpoint.name}: {name}'

    # Trainable rows: the by-hand reference, up to the reassociation of the clipping norm (see README).
    for name in BY_HAND:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6)


def test_without_the_ema_sync_checkpoints_would_hold_moved_frozen_rows(tmp_path, monkeypatch):
    """Why RegexFreeze corrects EMA: ``ema*s + p*(1-s)`` is not exactly ``p`` for a constant ``p``, and EMA swaps
    its averaged weights into the model to write checkpoints."""
    monkeypatch.setattr(RegexFreeze, '_EMA_SYNC_EVENTS', frozenset())
    model = support.seeded_tiny_decoder()
    initial = full_parameters(model)
    _run(
        model, [RegexFreeze(trainable=TRAINABLE, frozen=FROZEN), *_composer_algorithms()], model.parameters(), tmp_path
    )
    weights = torch.load(tmp_path / 'ep0-ba4-rank0.pt', map_location='cpu', weights_only=False)['state']['model']
    frozen = _frozen_mask('lm_head.weight', initial['lm_head.weight'].shape)
    assert not torch.equal(weights['model.lm_head.weight'][frozen], initial['lm_head.weight'][frozen])
