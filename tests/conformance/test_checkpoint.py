"""2: a run saved after the algorithm acted and resumed in a fresh Trainer ends bit-identical to an
uninterrupted one; a checkpoint written before the algorithm acted (a plain run) loads into it."""

import pytest
import torch

from conformance.harness import all_cases, assert_same_state, baseline, first_cases, ids, lm_loader, make_trainer, run

CASES = all_cases()


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_resume_mid_run_is_bit_identical(case, tmp_path):
    straight = baseline(case)
    run(case, save_folder=str(tmp_path), save_interval='2ep')
    resumed = run(case, load_path=str(tmp_path / 'ep2-ba8-rank0.pt'))
    assert resumed.batches_run == 4
    assert_same_state(resumed, straight)


def _logits(model) -> torch.Tensor:
    batch = next(iter(lm_loader(split=1, blocks=4)))
    model.eval()
    with torch.no_grad():
        return model(batch).logits


@pytest.fixture(scope='module')
def plain_checkpoint(tmp_path_factory):
    """A checkpoint of a run without any algorithm, and the logits it gives on a fixed batch."""
    folder = tmp_path_factory.mktemp('plain')
    plain = make_trainer([], max_duration='1ep', save_folder=str(folder), save_interval='1ep')
    plain.fit()
    return folder / 'ep1-ba4-rank0.pt', _logits(plain.state.model)


@pytest.mark.parametrize('case', first_cases(), ids=ids(first_cases()))
def test_loads_weights_saved_before_the_algorithm_acted(case, plain_checkpoint):
    path, expected = plain_checkpoint
    trainer = make_trainer([case.build()], load_path=str(path), load_weights_only=True)
    torch.testing.assert_close(_logits(trainer.state.model), expected, atol=1e-5, rtol=1e-5)
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 12
