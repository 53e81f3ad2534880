"""Save mid-run, resume in a fresh Trainer: the result is identical to an uninterrupted run."""

from __future__ import annotations

import pytest
import support
import torch
from composer.algorithms import EMA

from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.parameter_selection import user_module

from .reference import full_parameters

TRAINABLE = ['model.embed_tokens.weight[1000:2000]', 'model.layers.1', 'lm_head.weight[1500:2500]']
FROZEN = ['model.layers.1.mlp.down_proj.weight[4:12]']


def _trainer(algorithms, save_folder, **kwargs):
    model = support.seeded_tiny_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, support.cpu_trainer(
        model,
        algorithms,
        optimizer=optimizer,
        max_duration='10ba',
        save_folder=str(save_folder),
        save_interval='5ba',
        save_overwrite=True,
        **kwargs,
    )


@pytest.mark.parametrize('with_ema', [False, True], ids=['RegexFreeze', 'RegexFreeze+EMA'])
def test_resume_equals_uninterrupted_run(with_ema, tmp_path):
    extra = lambda: [EMA(half_life='3ba')] if with_ema else []  # noqa: E731
    model, trainer = _trainer([RegexFreeze(trainable=TRAINABLE, frozen=FROZEN), *extra()], tmp_path / 'run')
    initial = full_parameters(model)
    trainer.fit()
    uninterrupted = full_parameters(model)
    checkpoint = tmp_path / 'run' / 'ep0-ba5-rank0.pt'
    assert checkpoint.exists()

    algorithm = RegexFreeze(trainable=TRAINABLE, frozen=FROZEN)
    resumed_model, resumed = _trainer([algorithm, *extra()], tmp_path / 'resumed', load_path=str(checkpoint))
    assert int(resumed.state.timestamp.batch) == 5
    resumed.fit()
    final = full_parameters(resumed_model)
    different = [name for name in uninterrupted if not torch.equal(final[name], uninterrupted[name])]
    assert not different, f'resumed run differs from the uninterrupted one on {different}'
    assert not torch.equal(final['model.layers.1.mlp.up_proj.weight'], initial['model.layers.1.mlp.up_proj.weight'])
    assert torch.equal(final['model.embed_tokens.weight'][2000:], initial['model.embed_tokens.weight'][2000:])

    optimizer = resumed.state.optimizers[0]
    trainable = {
        id(p)
        for name, p in user_module(resumed_model).named_parameters()
        if name in algorithm.selection.as_plain_data()
    }
    assert {id(p) for p in optimizer.state} == trainable


def test_resuming_with_other_patterns_is_a_clear_error(tmp_path):
    _, trainer = _trainer([RegexFreeze(trainable=TRAINABLE, frozen=FROZEN)], tmp_path / 'run')
    trainer.fit(duration='5ba')
    with pytest.raises(ValueError, match=r'regex_freeze.trainable = .*trained with trainable = \[.*\]; its saved'):
        _trainer(
            [RegexFreeze(trainable=TRAINABLE + ['model.layers.2'], frozen=FROZEN)],
            tmp_path / 'other',
            load_path=str(tmp_path / 'run' / 'ep0-ba5-rank0.pt'),
        )


def test_load_weights_only_starts_a_new_phase_with_new_patterns(tmp_path):
    _, trainer = _trainer([RegexFreeze(trainable=TRAINABLE, frozen=FROZEN)], tmp_path / 'run')
    trainer.fit(duration='5ba')
    saved = torch.load(tmp_path / 'run' / 'ep0-ba5-rank0.pt', map_location='cpu', weights_only=False)['state']['model']
    model, phase_two = _trainer(
        [RegexFreeze(trainable=['model.layers.2'])],
        tmp_path / 'two',
        load_path=str(tmp_path / 'run' / 'ep0-ba5-rank0.pt'),
        load_weights_only=True,
    )
    phase_two.fit(duration='2ba')
    final = full_parameters(model)
    for name, value in final.items():
        if not name.startswith('model.layers.2.'):
            assert torch.equal(value, saved[f'model.{name}']), name


def test_resuming_a_plain_checkpoint_drops_the_frozen_tensors_state(tmp_path):
    """A checkpoint of a run without RegexFreeze loads fully; the frozen tensors then leave the optimizer."""
    _, plain = _trainer([], tmp_path / 'plain')
    plain.fit(duration='5ba')
    saved = torch.load(tmp_path / 'plain' / 'ep0-ba5-rank0.pt', map_location='cpu', weights_only=False)['state'][
        'model'
    ]
    algorithm = RegexFreeze(trainable=TRAINABLE, frozen=FROZEN)
    model, resumed = _trainer([algorithm], tmp_path / 'resumed', load_path=str(tmp_path / 'plain' / 'ep0-ba5-rank0.pt'))
    resumed.fit()
    final = full_parameters(model)
    assert torch.equal(final['model.layers.0.mlp.up_proj.weight'], saved['model.model.layers.0.mlp.up_proj.weight'])
    assert torch.equal(final['model.embed_tokens.weight'][2000:], saved['model.model.embed_tokens.weight'][2000:])
    assert not torch.equal(final['model.layers.1.mlp.up_proj.weight'], saved['model.model.layers.1.mlp.up_proj.weight'])
    params = dict(user_module(model).named_parameters())
    assert {id(p) for p in resumed.state.optimizers[0].state} == {
        id(params[name]) for name in algorithm.selection.as_plain_data()
    }
