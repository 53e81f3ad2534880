"""A non-finite loss stops training at its batch, before that batch changes any weight, in Python and in thaw run."""

import pytest
import torch
from support import REPO, cpu_trainer, seeded_tiny_decoder, set_args

from composer_thaw.callbacks.loss_guard import NonFiniteLossError, StopOnNonFiniteLoss
from composer_thaw.cli import EXIT_DIVERGED, main
from composer_thaw.recipes import building


def _poisoned(model, after_batches: int):
    """``model`` whose forward makes the loss nan from its ``after_batches + 1``-th call on."""
    calls = {'n': 0}
    forward = model.model.forward

    def poisoned_forward(*args, **kwargs):
        calls['n'] += 1
        output = forward(*args, **kwargs)
        if calls['n'] > after_batches:
            output.logits = output.logits * float('nan')
            if output.loss is not None:
                output.loss = output.loss * float('nan')
        return output

    model.model.forward = poisoned_forward
    return model


def test_the_first_nan_loss_stops_training_before_its_step():
    model = _poisoned(seeded_tiny_decoder(num_layers=1), after_batches=2)
    trainer = cpu_trainer(model, callbacks=[StopOnNonFiniteLoss()], max_duration='6ba')
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit()
    assert raised.value.batch == 3 and raised.value.value != raised.value.value  # nan
    assert int(trainer.state.timestamp.batch) == 2  # batches 1 and 2 trained, batch 3 did not step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_finite_losses_train_as_without_the_callback():
    plain = seeded_tiny_decoder(num_layers=1)
    guarded = seeded_tiny_decoder(num_layers=1)
    cpu_trainer(plain, max_duration='2ba').fit()
    cpu_trainer(guarded, callbacks=[StopOnNonFiniteLoss()], max_duration='2ba').fit()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), guarded.parameters()))


def test_thaw_run_reports_the_batch_in_one_line_and_exits_non_zero(monkeypatch, capsys):
    build = building.MODEL_BUILDERS['tiny-decoder']
    monkeypatch.setitem(building.MODEL_BUILDERS, 'tiny-decoder', lambda *a: _poisoned(build(*a), after_batches=1))
    recipe = str(REPO / 'yamls' / 'lora_decoder.yaml')
    overrides = ['max_duration=3ba', 'eval_interval=1ep', 'model.hidden_size=32', 'progress_bar=false']
    code = main(['run', recipe, *set_args(overrides)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_DIVERGED
    assert err[-1].startswith('thaw run: training stopped: the loss of training batch 2 is nan')
    assert 'Traceback' not in '\n'.join(err)
