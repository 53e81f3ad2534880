"""The low-precision mode (``master_weights='fp32'``) as a case of the suite: every algorithm that takes the option,
with its last example (the one that changes most during a short run), trains a bf16 model; at every step fp32
masters exist exactly for the low-precision tensors that train and equal their bf16 weights after the cast back;
the optimizer state is fp32; a run resumed from a mid-run checkpoint ends bit-identical (masters included)."""

from __future__ import annotations

import inspect

import pytest
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from composer_thaw.master_weights import LOW_PRECISION_DTYPES, master_weights_of
from composer_thaw.parameter_selection import user_module
from conformance.harness import Case, assert_same_state, covered_names, ids, last_cases, run, tiny_model


def _takes_master_weights(case: Case) -> bool:
    return 'master_weights' in inspect.signature(case.cls).parameters


CASES = [
    Case(c.name, c.index, {**c.kwargs, 'master_weights': 'fp32'}) for c in last_cases() if _takes_master_weights(c)
]


# 4 steps without evaluation (the suite's own cases cover evaluation): HiFT rotates through groups, LayerFreezing
# freezes units at the epoch's end (step 4), after the checkpoint at step 2.
SHORT = {'max_duration': '4ba', 'eval_dataloader': None}


def bf16_model():
    return tiny_model().to(torch.bfloat16)


class MasterCheck(Callback):
    """After every optimizer step: masters for exactly what trains, each equal to its weight; fp32 state."""

    def __init__(self) -> None:
        self.steps = 0
        self.master_bytes: list[int] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        optimizer = state.optimizers[0]
        masters = master_weights_of(optimizer)
        assert masters is not None, 'master_weights=fp32 attached nothing to the optimizer'
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
        trains = {
            id(p)
            for p in user_module(state.model).parameters()
            if p.requires_grad and id(p) in in_optimizer and p.dtype in LOW_PRECISION_DTYPES
        }
        assert set(masters.masters) == trains, 'fp32 masters exist for other tensors than those that train'
        for param, master in masters.masters.values():
            assert master.dtype == torch.float32 and param.dtype == torch.bfloat16
            assert torch.equal(master.to(torch.bfloat16), param.detach()), 'a bf16 weight is not its master, cast'
            for key, value in optimizer.state.get(param, {}).items():
                assert key == 'step' or value.dtype == torch.float32, f'optimizer state {key} is {value.dtype}'
        for param in user_module(state.model).parameters():
            if param.dtype == torch.float32:  # only adapters a bf16 base gets (PEFT's autocast_adapter_dtype)
                assert param.requires_grad, 'an fp32 copy of a frozen tensor'
        expected = 4 * sum(p.numel() for p, _ in masters.masters.values())
        assert masters.master_bytes() == expected
        self.master_bytes.append(masters.master_bytes())
        self.steps += 1


def test_every_algorithm_of_ours_has_the_mode():
    ours = {'hift_rotation', 'layer_freezing', 'lora_inject', 'regex_freeze'}
    assert ours <= set(covered_names())
    assert ours <= {case.name for case in CASES}


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_trains_in_bf16_with_masters_and_resumes_bit_identical(case, tmp_path):
    check = MasterCheck()
    straight = run(case, model=bf16_model(), callbacks=[check], save_folder=str(tmp_path), save_interval='2ba', **SHORT)
    assert check.steps == 4
    assert straight.loss_after < straight.loss_before
    assert all(p.dtype == torch.bfloat16 for name, p in straight.params.items() if 'lora_' not in name)
    assert 'master_weights' in straight.algorithm_state

    checkpoint = str(tmp_path / 'ep0-ba2-rank0.pt')
    resumed = run(case, model=bf16_model(), callbacks=[MasterCheck()], load_path=checkpoint, **SHORT)
    assert resumed.batches_run == 2
    assert_same_state(resumed, straight)
    saved, again = straight.algorithm_state['master_weights'], resumed.algorithm_state['master_weights']
    assert saved.keys() == again.keys()
    for name, master in saved.items():
        assert torch.equal(again[name], master), f'master of {name} differs after resuming'
