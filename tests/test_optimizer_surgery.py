"""Removing parameters from an optimizer frees their state; adding them back restores group and order."""

import torch
from torch import nn

from composer_thaw.utils.optimizer_surgery import (
    add_params,
    group_index_of,
    offload_state,
    optimizer_state_bytes,
    remove_params,
    restore_state,
    training_state_bytes,
)


def _trained_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    decay = [model[0].weight, model[1].weight]
    no_decay = [model[0].bias, model[1].bias]
    optimizer = torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}], lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_remove_params_deletes_state_group_membership_and_grad():
    model, optimizer = _trained_adamw()
    before = optimizer_state_bytes(optimizer)
    removed = remove_params(optimizer, [model[0].weight, model[1].bias])
    assert removed == {id(model[0].weight): 0, id(model[1].bias): 1}
    assert model[0].weight not in optimizer.state and model[1].bias not in optimizer.state
    assert model[0].weight.grad is None
    assert id(model[0].weight) not in group_index_of(optimizer)
    # exp_avg + exp_avg_sq in fp32, plus a 4-byte step counter each
    freed = 2 * 4 * (model[0].weight.numel() + model[1].bias.numel()) + 2 * 4
    assert before - optimizer_state_bytes(optimizer) == freed
    assert len(optimizer.param_groups) == 2  # groups stay, so schedulers and checkpoints keep their indices


def test_add_params_restores_group_and_model_order():
    model, optimizer = _trained_adamw()
    order = {id(p): i for i, p in enumerate(model.parameters())}
    removed = remove_params(optimizer, [model[0].weight])
    add_params(optimizer, {removed[id(model[0].weight)]: [model[0].weight]}, order)
    assert optimizer.param_groups[0]['params'] == [model[0].weight, model[1].weight]


def test_offload_and_restore_round_trip_bit_exactly():
    model, optimizer = _trained_adamw()
    params = [model[0].weight]
    original = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    offloaded = offload_state(optimizer, params, 'cpu')
    assert model[0].weight not in optimizer.state
    restore_state(optimizer, params, offloaded)
    assert all(torch.equal(original[k], optimizer.state[model[0].weight][k]) for k in original)


def test_training_state_bytes_counts_params_grads_and_state():
    model, optimizer = _trained_adamw()
    counts = training_state_bytes(model, optimizer)
    n = sum(p.numel() for p in model.parameters())
    assert (counts.params, counts.grads, counts.optimizer_state) == (4 * n, 4 * n, 2 * 4 * n + 4 * 4)
    assert counts.total == counts.params + counts.grads + counts.optimizer_state
