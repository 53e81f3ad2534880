"""3: under 2-process DDP (Composer's launcher, gloo) every case ends with identical parameters on both ranks,
close to a single-process run with the same global batch, and resumes at world size 2 bit-identically."""

import json

import pytest
import torch
from support import two_process_part

from conformance.harness import all_cases, baseline, ids

CASES = all_cases()
pytestmark = pytest.mark.multiprocess

# DDP averages two half-batch gradients where one process averages the whole batch: the sums are rounded
# differently, and after 12 AdamW steps the parameters differ by at most this much.
SINGLE_PROCESS_ATOL = 1e-4


@pytest.fixture(scope='module')
def ddp_results(two_processes):
    out = two_process_part(two_processes, 'ddp')
    return out, json.loads((out / 'results.json').read_text())


@pytest.mark.parametrize('case', CASES, ids=ids(CASES))
def test_ranks_identical_resumable_and_close_to_single_process(case, ddp_results):
    out, results = ddp_results
    straight, resumed = results[case.id]['straight'], results[case.id]['resumed']
    assert straight[0] == straight[1], 'ranks diverged'
    assert resumed == straight, 'resuming at world size 2 changed the result'
    params = torch.load(out / f'{case.id}.pt')
    single = baseline(case).params
    for name, value in single.items():
        torch.testing.assert_close(params[name], value, atol=SINGLE_PROCESS_ATOL, rtol=0, msg=name)
