"""Checkpoints resume: the frozen units are saved, frozen again on load before the optimizer state is loaded,
and a resumed run ends bit-identical to an uninterrupted one, without any warning about resumption."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from composer_thaw.core.state import STATE_VERSION_KEY
from composer_thaw.layer_freezing import LayerFreezing
from composer_thaw.utils.parameter_selection import user_module

from .conftest import frozen_names

CASES = {
    # (algorithm options, checkpoint interval, checkpoint to resume from); freezing starts before the checkpoint
    'leaf-per-epoch': (dict(freeze_start=0.0, freeze_level=1.0), '1ep', 'ep2-ba8-rank0.pt'),
    'block-every-3-batches': (
        dict(freeze_start=0.0, freeze_level=0.75, granularity='block', interval=3),
        '5ba',
        'ep2-ba10-rank0.pt',
    ),
}


@pytest.mark.parametrize('case', list(CASES))
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(make_model, make_trainer, tmp_path: Path, case):
    options, save_interval, resume_from = CASES[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        uninterrupted = make_model(num_layers=3)
        make_trainer(
            uninterrupted,
            [LayerFreezing(**options)],
            max_duration='4ep',
            save_folder=str(tmp_path),
            save_interval=save_interval,
        ).fit()

        checkpoint = torch.load(tmp_path / resume_from, weights_only=False)
        saved = checkpoint['state']['algorithms'][0][1]
        assert saved[STATE_VERSION_KEY] == 1 and saved['frozen_units']  # freezing happened before the save

        resumed = make_model(num_layers=3, seed=1)  # different initial weights: everything comes from the checkpoint
        make_trainer(
            resumed, [LayerFreezing(**options)], max_duration='4ep', load_path=str(tmp_path / resume_from)
        ).fit()

    assert not [w for w in caught if 'resum' in str(w.message).lower()]
    assert frozen_names(resumed) == frozen_names(uninterrupted)
    expected = dict(user_module(uninterrupted).named_parameters())
    for name, param in user_module(resumed).named_parameters():
        assert torch.equal(param, expected[name]), name


def test_checkpoint_from_another_granularity_is_refused(make_model, make_trainer):
    algorithm = LayerFreezing(granularity='block')
    make_trainer(make_model(), [algorithm])
    with pytest.raises(ValueError, match=r"granularity='leaf'.*granularity='block'"):
        algorithm.load_state_dict({STATE_VERSION_KEY: 1, 'granularity': 'leaf', 'frozen_units': ['model.embed_tokens']})


def test_state_loaded_before_the_trainer_starts_is_applied_at_init(make_model, make_trainer):
    algorithm = LayerFreezing(granularity='block')
    algorithm.load_state_dict({STATE_VERSION_KEY: 1, 'granularity': 'block', 'frozen_units': ['model.embed_tokens']})
    model = make_model()
    trainer = make_trainer(model, [algorithm])
    assert frozen_names(model) == ['model.embed_tokens.weight']
    assert all(p.requires_grad for group in trainer.state.optimizers[0].param_groups for p in group['params'])
    assert algorithm.state_dict()['frozen_units'] == ['model.embed_tokens']
