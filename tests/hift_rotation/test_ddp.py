"""Under DDP with 2 processes, ranks train the same group, stay bit-identical and resume exactly; freezing the
inactive groups before DDP wraps the model (the pitfall HiFTRotation avoids) lets ranks drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import two_process_part


@pytest.mark.multiprocess
def test_two_process_ddp_ranks_stay_identical_and_resume_exactly(two_processes: Path):
    out = two_process_part(two_processes, 'hift_rotation') / 'result.json'

    result = json.loads(out.read_text())
    assert result['world_size'] == 2
    assert result['ranks_read_different_data']  # so identical ranks mean gradients really were all-reduced
    assert result['batches'] == 12
    assert result['same_group_on_every_rank']
    assert result['ranks_identical_after_every_batch']
    assert result['inactive_params_with_grad'] == 0
    assert result['resumed_ranks_identical_after_every_batch']
    assert result['resumed_equals_uninterrupted']
    assert not all(result['frozen_at_wrap_ranks_identical_per_batch'])  # the pitfall is real
