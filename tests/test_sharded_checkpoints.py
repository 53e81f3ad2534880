"""The deferred optimizer read of sharded checkpoints (algorithms/utils/deferred_optimizer_load.py), in one process: the
template Composer reads into has the param groups and no per-parameter state, and building it allocates none.
Resuming from real sharded checkpoints is checked at 2 processes in tests/conformance/test_sharded.py."""

from types import SimpleNamespace

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from composer_thaw.utils.deferred_optimizer_load import defer_optimizer_load, load_deferred_optimizer


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _state(optimizer, sharded: bool = True):
    return SimpleNamespace(
        fsdp_enabled=sharded, fsdp_sharded_state_dict_enabled=sharded, optimizers=optimizer, load_path=None
    )


def test_the_load_template_has_param_groups_and_allocates_no_state():
    model, optimizer = _model_and_optimizer()
    state = _state(optimizer)
    defer_optimizer_load(state)
    template = get_optimizer_state_dict(model, optimizer)  # as Composer builds its load template
    assert template['state'] == {}
    assert [len(group['params']) for group in template['param_groups']] == [4]
    assert not any(isinstance(v, torch.Tensor) for s in optimizer.state.values() for v in s.values())
    assert len(get_optimizer_state_dict(model, optimizer)['state']) == 4  # later calls are as usual again
    assert len(optimizer.state) == 4
    load_deferred_optimizer(state)  # no checkpoint was loaded: nothing to read
    assert not optimizer._optimizer_state_dict_post_hooks


def test_without_a_checkpoint_the_optimizer_is_left_as_it_was():
    model, optimizer = _model_and_optimizer()
    state = _state(optimizer)
    defer_optimizer_load(state)
    load_deferred_optimizer(state)
    assert len(optimizer.state) == 0 and not optimizer._optimizer_state_dict_post_hooks
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert set(get_optimizer_state_dict(model, optimizer)['state']) == {'0.weight', '0.bias', '1.weight', '1.bias'}


def test_unsharded_runs_are_left_to_composer():
    _, optimizer = _model_and_optimizer()
    defer_optimizer_load(_state(optimizer, sharded=False))
    assert not optimizer._optimizer_state_dict_post_hooks and len(optimizer.state) == 0
