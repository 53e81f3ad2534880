"""7: repr evals back, recipes round-trip, checkpointed state is versioned, surgery is idempotent and
required on load, and a checkpoint that needs one of our algorithms names it when it is missing."""

import re

import pytest
import torch
import yaml
from composer.core import Event

from composer_thaw.core.checkpoint_algorithms import check_checkpoint_algorithms
from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.state import STATE_VERSION_KEY, eval_repr, init_arguments
from conformance.harness import all_cases, baseline, first_cases, ids, make_trainer, parameters

CASES = all_cases()


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_repr_has_no_addresses_and_evals_back_to_an_equal_algorithm(case):
    algorithm = case.build()
    text = repr(algorithm)
    assert not re.search(r'0x[0-9a-f]{6,}', text), text
    assert eval_repr(text) == algorithm


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_recipe_yaml_round_trips_to_the_same_configuration(case):
    algorithm = case.build()
    text = yaml.safe_dump({'algorithms': {case.name: init_arguments(algorithm)}})
    rebuilt = build_algorithm(case.name, yaml.safe_load(text)['algorithms'][case.name])
    assert rebuilt == algorithm


@pytest.mark.parametrize('case', first_cases(), ids=ids(first_cases()))
def test_checkpoint_state_is_versioned_and_unknown_versions_are_refused(case):
    state = baseline(case).algorithm_state
    assert state[STATE_VERSION_KEY] == 1
    fresh = case.build()
    with pytest.raises(ValueError, match=f'{type(fresh).__name__}.*version 99'):
        fresh.load_state_dict({**state, STATE_VERSION_KEY: 99})


SURGERY = [case for case in first_cases() if case.cls.required_on_load()]


@pytest.mark.parametrize('case', SURGERY, ids=ids(SURGERY))
def test_surgery_is_idempotent_and_changes_the_model(case):
    plain_names = set(parameters(make_trainer([])))
    trainer = make_trainer([case.build()])
    once = parameters(trainer)
    algorithm = trainer.state.algorithms[0]
    algorithm.apply(Event.INIT, trainer.state, trainer.logger)
    twice = parameters(trainer)
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert set(once) != plain_names


@pytest.mark.parametrize('case', first_cases(), ids=ids(first_cases()))
def test_resuming_without_the_algorithm_names_it(case, tmp_path):
    trainer = make_trainer([case.build()], max_duration='1ep', save_folder=str(tmp_path), save_interval='1ep')
    trainer.fit()
    checkpoint = tmp_path / 'ep1-ba4-rank0.pt'
    check_checkpoint_algorithms(checkpoint, [case.build()])  # present: fine
    with pytest.raises(ValueError, match=type(case.build()).__name__):
        check_checkpoint_algorithms(checkpoint, [])
