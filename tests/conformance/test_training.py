"""1, 5, 7b: every algorithm example trains under Composer's Trainer, acts only at the events it declares,
works wherever it sits in the algorithm list, and gives the same result with gradient accumulation."""

import pytest
from composer.algorithms import EMA, GradientClipping

from conformance.harness import all_cases, assert_same_state, baseline, first_cases, ids, run

CASES = all_cases()
FIRST = first_cases()


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_trains_with_eval_and_the_loss_goes_down(case):
    result = baseline(case)
    assert result.batches_run == 12
    assert result.eval_loss > 0
    assert result.loss_after < result.loss_before, f'loss {result.loss_before:.4f} -> {result.loss_after:.4f}'


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_acts_only_at_the_events_it_declares(case):
    declared = set(case.cls.events)
    seen = baseline(case).events
    assert seen, 'the algorithm never acted'
    assert seen <= declared, f'acted at undeclared events {sorted(e.value for e in seen - declared)}'


@pytest.mark.parametrize('case', FIRST, ids=ids(FIRST))
def test_position_in_the_algorithm_list_does_not_matter(case):
    def others():
        return [GradientClipping(clipping_type='norm', clipping_threshold=1.0), EMA(half_life='2ba')]

    assert_same_state(run(case, extra=others(), first=False), run(case, extra=others(), first=True))


@pytest.mark.parametrize('case', FIRST, ids=ids(FIRST))
def test_gradient_accumulation_matches_whole_batches(case):
    assert_same_state(run(case, device_train_microbatch_size=2), baseline(case), atol=2e-5)
