"""Freezing frees: a frozen parameter leaves the param groups and ``optimizer.state``, loses its gradient, stops
requiring grad, and is never updated or given a gradient again."""

from __future__ import annotations

import pytest
import torch
from composer import Callback
from composer.algorithms.layer_freezing import freeze_layers as composer_freeze_layers

from composer_thaw.layer_freezing import LayerFreezing, freeze_layers
from composer_thaw.utils.optimizer_surgery import optimizer_state_bytes
from composer_thaw.utils.parameter_selection import user_module


def _one_adamw_step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 1000, (2, 16))
    model.model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def test_frozen_parameters_leave_param_groups_and_optimizer_state_and_lose_gradients(make_model):
    model = make_model(num_layers=2)
    optimizer = _one_adamw_step(model)

    depth, _ = freeze_layers(
        model, optimizer, current_duration=1.0, freeze_start=0.0, freeze_level=2 / 3, granularity='block'
    )

    root = user_module(model)
    frozen = [p for n, p in root.named_parameters() if n.startswith(('model.embed_tokens.', 'model.layers.0.'))]
    trainable = [p for n, p in root.named_parameters() if not n.startswith(('model.embed_tokens.', 'model.layers.0.'))]
    in_groups = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert depth == 2
    for param in frozen:
        assert not param.requires_grad and param.grad is None
        assert id(param) not in in_groups and param not in optimizer.state
    for param in trainable:
        assert param.requires_grad and param.grad is not None
        assert id(param) in in_groups and param in optimizer.state


def test_optimizer_state_falls_by_the_frozen_share_of_parameters_where_composers_stays(make_model):
    ours, theirs = make_model(num_layers=2), make_model(num_layers=2)
    ours_optimizer, theirs_optimizer = _one_adamw_step(ours), _one_adamw_step(theirs)
    before = optimizer_state_bytes(ours_optimizer)
    assert before == optimizer_state_bytes(theirs_optimizer)

    freeze_layers(ours, ours_optimizer, current_duration=0.5, freeze_start=0.0, freeze_level=1.0)
    composer_freeze_layers(theirs, theirs_optimizer, current_duration=0.5, freeze_start=0.0, freeze_level=1.0)

    frozen_share = sum(p.numel() for p in ours.parameters() if not p.requires_grad) / sum(
        p.numel() for p in ours.parameters()
    )
    assert 0.2 < frozen_share < 0.8
    assert 1 - optimizer_state_bytes(ours_optimizer) / before == pytest.approx(frozen_share, abs=1e-4)
    assert optimizer_state_bytes(theirs_optimizer) == before


class _FrozenStayUntouched(Callback):
    """Checks, at every step, that frozen parameters have no gradient after backward and never change."""

    def __init__(self):
        self.snapshots: dict[str, torch.Tensor] = {}
        self.checked_steps = 0

    def after_train_batch(self, state, logger):  # after backward, before the optimizer step
        for name, param in user_module(state.model).named_parameters():
            if not param.requires_grad:
                assert param.grad is None, name
                self.checked_steps += 1

    def batch_end(self, state, logger):  # after the step and after LayerFreezing ran
        for name, param in user_module(state.model).named_parameters():
            if name in self.snapshots:
                assert torch.equal(param, self.snapshots[name]), f'{name} changed after it was frozen'
            elif not param.requires_grad:
                self.snapshots[name] = param.detach().clone()


def test_frozen_parameters_receive_no_gradient_and_stay_bit_identical_while_training(make_model, make_trainer):
    model = make_model(num_layers=2)
    check = _FrozenStayUntouched()
    make_trainer(
        model,
        [LayerFreezing(freeze_start=0.0, freeze_level=1.0, granularity='block', interval=1)],
        max_duration='2ep',
        callbacks=[check],
    ).fit()

    assert len(check.snapshots) == sum(1 for p in model.parameters() if not p.requires_grad) > 0
    assert check.checked_steps > 0
