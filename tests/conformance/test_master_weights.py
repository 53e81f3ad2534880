"""The low-precision mode (``master_weights='fp32'``) as a case of the suite: every algorithm that takes the option,
with its last example (the one that changes most during a short run), trains a bf16 model; at every step fp32
masters exist exactly for the low-precision tensors that train and equal their bf16 weights after the cast back;
the optimizer state is fp32; the weights equal an independent fp32 reference step by step (no master is ever made
again from its rounded weight); a run resumed from a mid-run checkpoint ends bit-identical (masters included)."""

from __future__ import annotations

import pytest
import torch

from conformance.harness import (
    MasterCheck,
    MasterReference,
    adamw,
    assert_same_state,
    bf16_model,
    covered_names,
    ids,
    master_weights_cases,
    run,
)

CASES = master_weights_cases()

# 8 steps without evaluation (the suite's own cases cover evaluation): HiFT visits each group twice (after the
# checkpoint at step 2 its parked masters come back from the checkpoint), LayerFreezing freezes units at the first
# epoch's end (step 4).
SHORT = {'max_duration': '8ba', 'eval_dataloader': None}


def test_every_algorithm_of_ours_has_the_mode():
    ours = {'hift_rotation', 'layer_freezing', 'lora_inject', 'regex_freeze'}
    assert ours <= set(covered_names())
    assert ours <= {case.name for case in CASES}


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_weights_equal_a_reference_that_keeps_every_master(case):
    reference = MasterReference()
    model = bf16_model()
    run(case, model=model, optimizers=adamw(model), callbacks=[reference], **SHORT)
    assert reference.steps == 8 and reference.masters
    assert reference.failures == []


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_trains_in_bf16_with_masters_and_resumes_bit_identical(case, tmp_path):
    check = MasterCheck()
    straight = run(case, model=bf16_model(), callbacks=[check], save_folder=str(tmp_path), save_interval='2ba', **SHORT)
    assert check.steps == 8 and check.failures == []
    assert straight.loss_after < straight.loss_before
    assert all(p.dtype == torch.bfloat16 for name, p in straight.params.items() if 'lora_' not in name)
    assert 'master_weights' in straight.algorithm_state

    checkpoint = str(tmp_path / 'ep0-ba2-rank0.pt')
    check = MasterCheck()
    resumed = run(case, model=bf16_model(), callbacks=[check], load_path=checkpoint, **SHORT)
    assert check.steps == 6 and check.failures == []
    assert resumed.batches_run == 6
    assert_same_state(resumed, straight)
    saved, again = straight.algorithm_state['master_weights'], resumed.algorithm_state['master_weights']
    assert saved.keys() == again.keys()
    for name, master in saved.items():
        assert torch.equal(again[name], master), f'master of {name} differs after resuming'
