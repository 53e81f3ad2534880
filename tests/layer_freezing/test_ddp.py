"""Under DDP with 2 processes, freezing mid-run keeps ranks bit-identical, and resumption at world size 2 is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import two_process_part


@pytest.mark.multiprocess
def test_two_process_ddp_ranks_stay_identical_and_resume_exactly(two_processes: Path):
    out = two_process_part(two_processes, 'layer_freezing') / 'result.json'

    result = json.loads(out.read_text())
    assert result['world_size'] == 2
    assert result['ranks_read_different_data']  # so identical ranks mean gradients really were all-reduced
    assert result['ranks_identical_after_every_batch']
    counts = result['frozen_params_per_batch']
    assert counts[0] == 0 < counts[3] < counts[-1]  # freezing happened mid-run and grew
    assert result['frozen_params_with_grad'] == 0
    assert result['resumed_ranks_identical_after_every_batch']
    assert result['resumed_equals_uninterrupted']
