"""Freezing is re-evaluated every ``interval`` batches, so a single-epoch fine-tune freezes progressively; the
``schedule`` hook replaces the linear schedule; metrics are logged as Composer names them."""

from __future__ import annotations

from composer.loggers import InMemoryLogger

from composer_thaw.layer_freezing import LayerFreezing
from composer_thaw.utils.optimizer_surgery import optimizer_state_bytes

from .conftest import FrozenRecorder


def _unit_of(name: str) -> str:
    return 'embed' if name.startswith('model.embed_tokens.') else name.split('.')[2]


def _frozen_units(recorder):
    return [sorted({_unit_of(name) for name in names}) for names in recorder.frozen]


def test_a_single_epoch_run_freezes_progressively_every_interval_batches(make_model, make_trainer):
    model = make_model(num_layers=2)
    recorder = FrozenRecorder(every_batch=True)
    algorithm = LayerFreezing(freeze_start=0.0, freeze_level=1.0, granularity='block', interval=2)
    make_trainer(model, [algorithm], max_duration='1ep', batch_size=2, callbacks=[recorder]).fit()  # 8 batches

    # elapsed 0.25, 0.5, 0.75, 1.0 at batches 2, 4, 6, 8 -> int(elapsed * 3 units) units frozen
    assert _frozen_units(recorder) == [
        [],
        [],
        [],
        ['embed'],
        ['embed'],
        ['0', 'embed'],
        ['0', 'embed'],
        ['0', '1', 'embed'],
    ]


def test_interval_in_batches_with_max_duration_in_batches(make_model, make_trainer):
    recorder = FrozenRecorder(every_batch=True)
    algorithm = LayerFreezing(freeze_start=0.0, freeze_level=1.0, granularity='block', interval=3)
    make_trainer(make_model(num_layers=2), [algorithm], max_duration='6ba', callbacks=[recorder]).fit()
    assert _frozen_units(recorder) == [[], [], ['embed'], ['embed'], ['embed'], ['0', '1', 'embed']]


def test_schedule_hook_replaces_the_linear_schedule(make_model, make_trainer):
    def all_at_half_time(elapsed: float, freeze_start: float, freeze_level: float) -> float:
        return freeze_level if elapsed >= 0.5 else 0.0

    recorder = FrozenRecorder(every_batch=True)
    algorithm = LayerFreezing(freeze_level=1.0, granularity='block', interval=1, schedule=all_at_half_time)
    make_trainer(make_model(num_layers=2), [algorithm], max_duration='4ba', callbacks=[recorder]).fit()
    assert _frozen_units(recorder) == [[], ['0', '1', 'embed'], ['0', '1', 'embed'], ['0', '1', 'embed']]


def test_logs_layers_and_fraction_frozen_trainable_parameters_and_optimizer_state_bytes(make_model, make_trainer):
    model, metrics = make_model(num_layers=2), InMemoryLogger()
    trainer = make_trainer(
        model, [LayerFreezing(freeze_start=0.0, granularity='block')], max_duration='2ep', loggers=[metrics]
    )
    trainer.fit()

    def logged(key):
        return [value for _, value in metrics.data[f'layer_freezing/{key}']]

    assert logged('layers_frozen') == [1, 3]
    assert logged('percentage_frozen') == [0.5, 1.0]
    assert logged('trainable_params')[-1] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert logged('trainable_params')[0] > logged('trainable_params')[1]
    assert logged('optimizer_state_bytes')[-1] == optimizer_state_bytes(trainer.state.optimizers[0])
