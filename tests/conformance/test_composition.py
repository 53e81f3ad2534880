"""4: each algorithm composes with Composer's GradientClipping, EMA and a CPU surgery algorithm (Factorize on
the decoder's linear layers), and each meaningful pair of ours trains correctly or is refused at construction."""

import pytest
import torch
from composer.algorithms import EMA, Factorize, GradientClipping

from conformance.harness import baseline, first_cases, make_trainer, parameters, run

FIRST = first_cases()


def _composer_algorithms():
    return {
        'gradient_clipping': lambda: GradientClipping(clipping_type='norm', clipping_threshold=0.5),
        'ema': lambda: EMA(half_life='2ba'),
        'factorize': lambda: Factorize(factorize_convs=False, min_features=16, latent_features=8),
    }


COMPOSER = _composer_algorithms()
PAIRS = [(case, other) for case in FIRST for other in COMPOSER]


@pytest.mark.parametrize(('case', 'other'), PAIRS, ids=[f'{c.id}+{o}' for c, o in PAIRS])
def test_composes_with_composer_algorithms(case, other):
    result = run(case, extra=[COMPOSER[other]()])
    assert result.batches_run == 12
    assert result.loss_after < result.loss_before
    # parameters our algorithm keeps frozen from the start stay bit-identical, whatever the other algorithm does
    alone, plain = baseline(case).params, initial_parameters(None)
    frozen = [n for n in alone if n in plain and torch.equal(alone[n], plain[n])]
    initial = initial_parameters(other)
    checked = [n for n in frozen if n in initial and n in result.params]
    for name in checked:
        assert torch.equal(result.params[name], initial[name]), f'{name} moved although frozen'


_INITIAL: dict = {}


def initial_parameters(other) -> dict[str, torch.Tensor]:
    """The tiny model's parameters right after INIT with Composer algorithm ``other`` (or none) applied."""
    if other not in _INITIAL:
        trainer = make_trainer([COMPOSER[other]()] if other else [])
        _INITIAL[other] = parameters(trainer)
        trainer.close()
    return _INITIAL[other]
