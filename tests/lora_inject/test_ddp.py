"""Under DDP with 2 processes, LoRAInject keeps ranks bit-identical, the base untouched, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import two_process_part


@pytest.mark.multiprocess
def test_two_process_ddp_ranks_stay_identical_and_resume_exactly(two_processes: Path):
    out = two_process_part(two_processes, 'lora_inject') / 'result.json'
    result = json.loads(out.read_text())
    assert result == {
        'world_size': 2,
        'ranks_read_different_data': True,
        'ranks_identical_after_every_batch': True,
        'base_unchanged': True,
        'frozen_params_with_grad': 0,
        'resumed_ranks_identical_after_every_batch': True,
        'resumed_equals_uninterrupted': True,
        'adapter_saved': True,
        'checkpoint_without_frozen_base': True,
    }
