"""The visiting order is HiFT's: a queue whose head group moves to the tail, passes of len(units) // group_size
switches; ``random`` draws a new order each pass from the run's seed; ``steps_per_group`` repeats each group."""

from __future__ import annotations

import pytest
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.hift_rotation import GroupQueue, HiFTRotation, plan_rotation
from composer_thaw.utils.parameter_selection import user_module

from .helpers import StepWatcher
from .hift_reference import hift_handler, hift_visiting_order


@pytest.mark.parametrize('strategy', ['down2up', 'up2down'])
@pytest.mark.parametrize('group_size', [1, 2, 3, 7])
@pytest.mark.parametrize('freeze', [[], [0, 5]])
def test_order_matches_hift_trainer_queue(strategy, group_size, freeze):
    root = user_module(seeded_tiny_decoder())
    plan = plan_rotation(root, freeze=freeze)
    if group_size > len(plan.rotating):
        pytest.skip('group larger than the rotating units')
    handler = hift_handler('llama', 'CAUSAL_LM', freeze_layers=freeze, strategy=strategy)
    elements = handler.group_model(root)  # hift's element strings, e.g. 'embed_tokens', '.0.', ..., 'lm_head'
    model_order = elements if strategy == 'down2up' else list(reversed(elements))
    unit_of = dict(zip(model_order, plan.rotating))
    theirs = [tuple(unit_of[e] for e in group) for group in hift_visiting_order(elements, group_size, 25)]
    queue = GroupQueue(plan.rotating, group_size, strategy)
    ours = [queue.next_group()[0] for _ in range(25)]
    assert ours == theirs


def test_passes_are_len_over_group_size_switches_and_shift_when_not_divisible():
    queue = GroupQueue(range(7), 2, 'down2up')
    switches = [queue.next_group() for _ in range(7)]
    assert [group for group, _ in switches] == [(0, 1), (2, 3), (4, 5), (6, 0), (1, 2), (3, 4), (5, 6)]
    assert [new_pass for _, new_pass in switches] == [True, False, False, True, False, False, True]


def test_random_draws_a_fresh_permutation_each_pass_reproducible_from_the_seed():
    def passes(seed):
        queue = GroupQueue(range(7), 1, 'random', seed=seed)
        return [[queue.next_group()[0][0] for _ in range(7)] for _ in range(4)]

    first = passes(17)
    assert all(sorted(order) == list(range(7)) for order in first)  # every unit once per pass
    assert len({tuple(order) for order in first}) > 1  # not the same order every pass
    assert passes(17) == first and passes(18) != first


def test_trainer_switches_every_steps_per_group_steps_in_hift_order():
    watcher = StepWatcher()
    model = seeded_tiny_decoder()
    cpu_trainer(
        model,
        [HiFTRotation(group_size=3, strategy='up2down', steps_per_group=2)],
        max_duration='8ba',
        callbacks=[watcher],
    ).fit()
    units = [u.name for u in plan_rotation(user_module(seeded_tiny_decoder())).units]
    expected = [group for group in hift_visiting_order(list(reversed(range(7))), 3, 4) for _ in range(2)]
    for trainable, group in zip(watcher.trainable, expected):
        owners = {next(i for i, u in enumerate(units) if n.startswith(u + '.')) for n in trainable}
        assert owners == set(group)


def test_random_order_is_seeded_by_the_run_seed_not_the_rank():
    def order(seed):
        watcher = StepWatcher()
        cpu_trainer(
            seeded_tiny_decoder(), [HiFTRotation(strategy='random')], max_duration='7ba', callbacks=[watcher], seed=seed
        ).fit()
        return [names[0] for names in watcher.trainable]

    assert order(3) == order(3) != order(4)
