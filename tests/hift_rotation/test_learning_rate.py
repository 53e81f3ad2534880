"""``lr_per_pass`` holds the learning rate constant within a pass at the schedule's value at the pass's first step;
the schedule keeps its length and decays to its end (also schedulers that read ``group['lr']``). By default
Composer's per-step schedule is untouched."""

from __future__ import annotations

import pytest
import torch
from composer.optim import LinearScheduler
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.hift_rotation import HiFTRotation

from .helpers import StepWatcher

SCHEDULERS = {
    'composer-linear': lambda optimizer: LinearScheduler(alpha_i=1.0, alpha_f=0.0),
    'torch-exponential': lambda optimizer: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8),  # chainable
}


def _lrs(scheduler: str, **options):
    model = seeded_tiny_decoder()
    watcher = StepWatcher()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cpu_trainer(
        model,
        [HiFTRotation(**options)],
        optimizer=optimizer,
        max_duration='12ba',
        callbacks=[watcher],
        schedulers=SCHEDULERS[scheduler](optimizer),
        step_schedulers_every_batch=True,
    ).fit()
    return [lrs[0] for lrs in watcher.lrs], optimizer.param_groups[0]['lr']


@pytest.mark.parametrize('scheduler', list(SCHEDULERS))
def test_held_learning_rate_is_the_schedules_value_at_each_pass_start(scheduler):
    per_step, final = _lrs(scheduler, group_size=2)
    held, held_final = _lrs(scheduler, group_size=2, lr_per_pass=True)
    assert len(set(per_step)) >= 10  # the schedule moves (almost) every step
    steps_per_pass = 3  # 7 units in groups of 2
    assert held == [per_step[step - step % steps_per_pass] for step in range(12)]
    assert held_final == pytest.approx(final)  # the schedule ran its full length


def test_pass_length_counts_steps_per_group():
    per_step, _ = _lrs('composer-linear', group_size=3, steps_per_group=2)
    held, _ = _lrs('composer-linear', group_size=3, steps_per_group=2, lr_per_pass=True)
    assert held == [per_step[step - step % 4] for step in range(12)]  # 2 groups x 2 steps per pass
