"""8: on a GPU, the same training with bf16 mixed precision, and sharded with FSDP2.
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


@pytest.mark.parametrize('case', FIRST, ids=ids(FIRST))
def test_trains_under_fsdp2_with_bf16(case):
    from composer.utils.parallelism import FSDP2Config

    result = run(case, device='gpu', precision='amp_bf16', parallelism_config={'fsdp': FSDP2Config()})
    assert result.batches_run == 12 and result.loss_after < result.loss_before
