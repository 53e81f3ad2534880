"""Under DDP with 2 processes, RegexFreeze keeps ranks bit-identical and frozen rows exact, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import two_process_part


@pytest.mark.multiprocess
def test_two_process_ddp(two_processes: Path):
    out = two_process_part(two_processes, 'regex_freeze') / 'result.json'
    result = json.loads(out.read_text())
    assert result == {
        'world_size': 2,
        'ranks_read_different_data': True,
        'ranks_identical_after_every_batch': True,
        'frozen_elements_exact_on_every_rank': True,
        'trainable_rows_moved': True,
        'optimizer_state_only_for_trainable': True,
        'resumed_ranks_identical_after_every_batch': True,
        'resumed_equals_uninterrupted': True,
    }
