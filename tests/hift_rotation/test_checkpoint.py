"""A run resumed mid-pass (and mid-group) from a checkpoint ends bit-identical to an uninterrupted one: rotation
position, queue, generator, held learning rate and the offloaded optimizer state are saved and restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.optim import LinearScheduler
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.core.state import STATE_VERSION_KEY
from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.utils.parameter_selection import user_module

from .helpers import StepWatcher

CASES = {
    'random-2-steps-per-group-lr-per-pass': dict(strategy='random', steps_per_group=2, lr_per_pass=True),
    'adagrad-groups-of-3': dict(group_size=3, strategy='up2down'),
}


def _train(options, seed, optimizer_cls=torch.optim.AdamW, **kwargs):
    model = seeded_tiny_decoder(seed=seed)
    watcher = StepWatcher()
    optimizer = optimizer_cls(model.parameters(), lr=1e-2)
    cpu_trainer(
        model,
        [HiFTRotation(**options)],
        optimizer=optimizer,
        max_duration='13ba',
        callbacks=[watcher],
        schedulers=LinearScheduler(alpha_f=0.1),
        **kwargs,
    ).fit()
    return model, watcher, optimizer


@pytest.mark.parametrize('case', list(CASES))
def test_resume_mid_pass_is_bit_identical(tmp_path: Path, case):
    options = CASES[case]
    optimizer_cls = torch.optim.Adagrad if 'adagrad' in case else torch.optim.AdamW
    straight, straight_watch, straight_optimizer = _train(
        options, 0, optimizer_cls, save_folder=str(tmp_path), save_interval='5ba'
    )
    saved = torch.load(tmp_path / 'ep0-ba5-rank0.pt', weights_only=False)['state']['algorithms'][0][1]
    assert saved[STATE_VERSION_KEY] == 1 and saved['offloaded_state'] and saved['steps_started'] == 5

    resumed, resumed_watch, resumed_optimizer = _train(
        options, 1, optimizer_cls, load_path=str(tmp_path / 'ep0-ba5-rank0.pt')
    )
    assert resumed_watch.trainable == straight_watch.trainable[5:]
    assert resumed_watch.lrs == straight_watch.lrs[5:]
    expected = dict(user_module(straight).named_parameters())
    for name, param in user_module(resumed).named_parameters():
        assert torch.equal(param, expected[name]), name
    names = {id(p): n for n, p in user_module(straight).named_parameters()}
    resumed_names = {id(p): n for n, p in user_module(resumed).named_parameters()}
    expected_state = {names[id(p)]: s for p, s in straight_optimizer.state.items()}
    assert {resumed_names[id(p)] for p in resumed_optimizer.state} == set(expected_state)
    for param, state in resumed_optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, expected_state[resumed_names[id(param)]][key])


def test_checkpoint_of_another_unit_layout_is_refused():
    algorithm = HiFTRotation()
    cpu_trainer(seeded_tiny_decoder(), [algorithm])
    state = algorithm.state_dict()
    state['units'] = state['units'][:-1]
    with pytest.raises(ValueError, match="this model's units are"):
        algorithm.load_state_dict(state)
