"""With default options, LayerFreezing freezes what Composer's LayerFreezing freezes, when it does, and trains the
same parameters to the same values (models without tied weights)."""

from __future__ import annotations

import pytest
import torch
from composer.algorithms import LayerFreezing as ComposerLayerFreezing
from composer.loggers import InMemoryLogger

from composer_thaw.layer_freezing import LayerFreezing, freeze_layers
from composer_thaw.utils.parameter_selection import user_module

from .conftest import FrozenRecorder


def _run(make_model, make_trainer, algorithm, arch):
    model = make_model(arch)
    recorder, metrics = FrozenRecorder(), InMemoryLogger()
    make_trainer(model, [algorithm], max_duration='4ep', callbacks=[recorder], loggers=[metrics]).fit()
    logged = {
        key: [value for _, value in metrics.data[key]]
        for key in ('layer_freezing/layers_frozen', 'layer_freezing/percentage_frozen')
    }
    return model, recorder.frozen, logged


@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_default_options_freeze_the_same_layers_at_the_same_epochs_and_train_identically(
    make_model, make_trainer, arch
):
    theirs, theirs_frozen, theirs_logged = _run(make_model, make_trainer, ComposerLayerFreezing(), arch)
    ours, ours_frozen, ours_logged = _run(make_model, make_trainer, LayerFreezing(), arch)

    assert ours_frozen == theirs_frozen
    assert [len(names) for names in ours_frozen][:2] == [0, 0]  # freeze_start=0.5: nothing before half-way
    assert 0 < len(ours_frozen[2]) < len(ours_frozen[3])  # then more and more
    assert ours_logged == theirs_logged
    theirs_params = dict(user_module(theirs).named_parameters())
    for name, param in user_module(ours).named_parameters():
        assert torch.equal(param, theirs_params[name]), name


@pytest.mark.parametrize('elapsed', [0.0, 0.5, 0.6, 0.75, 0.9, 1.0])
@pytest.mark.parametrize('freeze_start,freeze_level', [(0.5, 1.0), (0.0, 1.0), (0.2, 0.7), (0.0, 0.33)])
def test_functional_form_returns_and_freezes_what_composers_does(make_model, elapsed, freeze_start, freeze_level):
    from composer.algorithms.layer_freezing import freeze_layers as composer_freeze_layers

    theirs, ours = make_model(num_layers=3), make_model(num_layers=3)
    theirs_result = composer_freeze_layers(
        theirs, torch.optim.SGD(theirs.parameters(), lr=0.1), elapsed, freeze_start, freeze_level
    )
    ours_result = freeze_layers(ours, torch.optim.SGD(ours.parameters(), lr=0.1), elapsed, freeze_start, freeze_level)

    assert ours_result == theirs_result
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
