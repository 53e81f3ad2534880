"""Exactly one group trains per step: the others hold no gradient and no optimizer state and stay bit-identical;
offloading is exact (a run with it equals one without, for every optimizer with per-parameter state); groups
switch only between optimizer steps, never between microbatches."""

from __future__ import annotations

import pytest
import torch
from composer.algorithms import GradientClipping
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.utils.parameter_selection import user_module

from .helpers import StepWatcher

OPTIMIZERS = {
    'adamw': lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    'adam': lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.01),
    'sgd-momentum': lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.01),
    'adagrad': lambda params: torch.optim.Adagrad(params, lr=0.1, weight_decay=0.01),
}


def _run(optimizer: str, max_duration: str = '9ba', extra=(), trainer_options=None, **options):
    model = seeded_tiny_decoder()
    watcher = StepWatcher()
    algorithm = HiFTRotation(**options)
    trainer = cpu_trainer(
        model,
        [algorithm, *extra],
        optimizer=OPTIMIZERS[optimizer](model.parameters()),
        max_duration=max_duration,
        callbacks=[watcher],
        **(trainer_options or {}),
    )
    trainer.fit()
    return model, watcher, algorithm, trainer


@pytest.mark.parametrize('optimizer', list(OPTIMIZERS))
def test_only_the_active_group_changes_has_gradients_and_holds_optimizer_state(optimizer):
    _, watcher, _, _ = _run(optimizer, group_size=2)
    assert len(watcher.trainable) == 9
    for step, trainable in enumerate(watcher.trainable):
        assert set(watcher.changed[step]) <= set(trainable), f'step {step}: a parameter outside the group changed'
        assert len(watcher.changed[step]) > 0
        assert set(watcher.with_grad[step]) == set(trainable), f'step {step}'
        if optimizer != 'sgd-momentum' or step > 0:
            assert watcher.state_names[step] == sorted(trainable), f'step {step}: optimizer state beyond the group'


@pytest.mark.parametrize('optimizer', list(OPTIMIZERS))
def test_offloading_is_exact_after_three_passes(optimizer):
    offloaded, off_watch, _, _ = _run(optimizer, group_size=2, offload=True)  # 7 units, 3 groups a pass: 9 steps
    resident, on_watch, _, _ = _run(optimizer, group_size=2, offload=False)
    expected = dict(user_module(resident).named_parameters())
    for name, param in user_module(offloaded).named_parameters():
        assert torch.equal(param, expected[name]), name
    assert max(off_watch.state_bytes) < max(on_watch.state_bytes)  # without offload, state accumulates


def test_resident_optimizer_state_is_the_active_groups_worth():
    model, watcher, algorithm, _ = _run('adamw', group_size=1, always_trainable=['norm'])
    params = dict(user_module(model).named_parameters())
    for trainable, state_bytes in zip(watcher.trainable, watcher.state_bytes):
        adam = sum(2 * params[n].numel() * 4 + 4 for n in trainable)  # exp_avg, exp_avg_sq, step (fp32 scalar)
        assert state_bytes == adam
    total_adam = sum(2 * p.numel() * 4 + 4 for p in params.values())
    assert algorithm.rotation.offloaded_bytes() + watcher.state_bytes[-1] == total_adam  # nothing lost


def test_microbatches_of_one_step_train_the_same_group():
    _, watcher, _, _ = _run(
        'adamw', max_duration='6ba', trainer_options={'device_train_microbatch_size': 1}, group_size=1
    )
    for step, per_microbatch in enumerate(watcher.microbatch_trainable):
        assert len(per_microbatch) == 4
        assert all(names == watcher.trainable[step] for names in per_microbatch)
    assert len({tuple(names) for names in watcher.trainable}) == 6


def test_composes_with_gradient_clipping():
    clipping = GradientClipping(clipping_type='norm', clipping_threshold=1e-3)
    _, watcher, _, _ = _run('adamw', extra=[clipping], group_size=2)
    for step, trainable in enumerate(watcher.trainable):
        assert set(watcher.changed[step]) <= set(trainable)


def test_always_trainable_units_train_every_step_next_to_the_group():
    _, watcher, _, _ = _run('adamw', group_size=1, always_trainable=['lm_head'], freeze=[0])
    for trainable in watcher.trainable:
        assert 'lm_head.weight' in trainable and 'model.embed_tokens.weight' not in trainable
    assert all('model.embed_tokens.weight' not in changed for changed in watcher.changed)
