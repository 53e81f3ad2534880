"""8: on a GPU, the same training with bf16 mixed precision, and FSDP for the algorithms that support it.
Skipped on machines without CUDA (CI has none)."""

import pytest
import torch

from conformance.harness import first_cases, ids, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU; CI and dev machines have none')
FIRST = first_cases()


@pytest.mark.parametrize('case', FIRST, ids=ids(FIRST))
def test_trains_on_gpu_with_bf16(case):
    result = run(case, device='gpu', precision='amp_bf16')
    assert result.batches_run == 12 and result.loss_after < result.loss_before


FSDP_CASES = [case for case in FIRST if case.name in ('lora_inject', 'regex_freeze')]


@pytest.mark.parametrize('case', FSDP_CASES, ids=ids(FSDP_CASES))
def test_trains_under_fsdp_with_original_parameters(case):
    result = run(case, device='gpu', precision='amp_bf16',
                 parallelism_config={'fsdp': {'use_orig_params': True, 'sharding_strategy': 'FULL_SHARD'}})
    assert result.batches_run == 12 and result.loss_after < result.loss_before
