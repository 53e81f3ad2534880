"""Hybrid sharding (HSDP, :class:`composer_thaw.utils.hybrid_sharding.HSDPConfig`): 4 processes launched as two
nodes of 2 on localhost, 2 replicas x 2 shards (tests/four_processes.py). Each algorithm trains like one process
(the sharded tolerance), keeps frozen elements bit-identical and holds optimizer state only for what trains, sharded
within each replica; in the low-precision mode the fp32 masters are sharded like their weights, match an fp32
reference at every step, and a resume from an HSDP checkpoint is bit-identical."""

import pytest
import torch
from support import part_results

from conformance.harness import (
    assert_like_one_process,
    assert_masters_case_passed,
    assert_optimizer_state_sharded,
    ids,
    last_cases,
    master_weights_cases,
)

LAST = last_cases()
MASTER_CASES = master_weights_cases()


@pytest.fixture(scope='module')
def hsdp_results(four_processes):
    return part_results(four_processes, 'hsdp')


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', LAST, ids=ids(LAST))
def test_hsdp_training_matches_one_process(case, hsdp_results):
    out, results = hsdp_results
    result = results[case.id]
    assert result['all_parameters_sharded'], 'HSDP left parameters unsharded'
    assert result['optimizer']['mesh_shape'] == [2, 2], 'not a 2-D mesh of 2 replicas x 2 shards'
    assert_like_one_process(torch.load(out / f'{case.id}.pt'), case, 'HSDP run')
    assert_optimizer_state_sharded(result['optimizer'], case)


@pytest.mark.multiprocess
@pytest.mark.parametrize('case', MASTER_CASES, ids=ids(MASTER_CASES))
def test_hsdp_bf16_weights_with_fp32_masters_train_and_resume_exactly(case, hsdp_results):
    """The HSDP resume of each algorithm (its own state, the optimizer state and the masters): bit-identical."""
    assert_masters_case_passed(hsdp_results[1]['master_weights'][case.id], case, shards=2, replicas=2)
